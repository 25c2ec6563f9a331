"""The OpenAI-compatible HTTP server (FastAPI): `create_app(ServeConfig(...))`, or `nanoseek serve MODEL_DIR`."""
from nanoseek.server.api import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
