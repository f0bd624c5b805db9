"""`gptrun serve`: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

Needs the `serve` extra (`pip install "gptexport[serve]"`: starlette, uvicorn, prometheus-client); the
rest of the runtime does not import this package.
"""

from .app import ServeConfig, Service, create_app
from .server import serve

__all__ = ["ServeConfig", "Service", "create_app", "serve"]
