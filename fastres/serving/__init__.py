"""`fastres serve`: an Open Inference Protocol (KServe v2) endpoint on Ray Serve.

config (ServeConfig) and protocol (the OIP messages) import without Ray; driver (start, serve_forever)
imports Ray and the deployment only when it starts one, so importing this package never needs Ray.
"""

from .config import ServeConfig
from .driver import Server, serve_forever, start

__all__ = ["ServeConfig", "Server", "serve_forever", "start"]
