"""Test helpers: tiny models and a local Hub-compatible server."""
