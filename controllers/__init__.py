"""rigfm: controllers package."""
