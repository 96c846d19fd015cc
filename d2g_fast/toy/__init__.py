"""The embedded toy text-to-image world (placeholder docstring, API below is filled in)."""
