"""The OpenAI-compatible HTTP server: FastAPI routes over one engine thread."""
