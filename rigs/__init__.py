"""rigfm: rigs package."""
