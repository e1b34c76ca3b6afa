"""Typed errors users can act on. Every message says what was wrong and what to do instead."""


class FastresError(Exception):
    """Base class of every error fastres raises on purpose."""


class UnknownModelError(FastresError, ValueError):
    """A model name that is not in the ResNet family fastres supports."""


class CheckpointError(FastresError, ValueError):
    """A checkpoint that cannot be read, or does not fit the requested architecture."""


class ArchitectureMismatchError(CheckpointError):
    """The checkpoint describes a different network than the one asked for."""


class InputError(FastresError, ValueError):
    """An input batch the engine cannot run (wrong rank, channels, dtype, ...)."""


class ImageDecodeError(InputError):
    """An image file (or bytes) that Pillow cannot decode: corrupt, truncated or not an image."""


class BackendUnavailableError(FastresError, RuntimeError):
    """The requested backend or device cannot run on this machine."""


class ConfigError(FastresError, ValueError):
    """An option or setting fastres cannot honour (bad dtype, batch size, port, ...)."""


class RequestError(FastresError):
    """A request a server refuses: `status` is the HTTP status (4xx), `headers` extra response headers
    (Allow for a 405, WWW-Authenticate for a 401)."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})
