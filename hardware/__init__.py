"""rigfm: hardware package."""
