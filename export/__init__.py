"""rigfm: export package."""
