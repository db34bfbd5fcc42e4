"""apimeta."""
