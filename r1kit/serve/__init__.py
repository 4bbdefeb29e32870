"""Serving: an OpenAI-compatible API with the reasoning trace apart, a web chat page, router and gate."""
