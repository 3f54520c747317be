"""A deterministic backend for tests, and the template for custom backends."""
