"""rigfm: fm_core package."""
