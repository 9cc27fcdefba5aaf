"""Errors the engine raises to its users (and the HTTP server turns into status codes)."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The request could not be served: an instance holding it died, or none is alive to take
    it. The message says which."""


class EngineOverloadedError(RuntimeError):
    """Every instance that could take the request has its queue full; retry later."""


class RequestTimeoutError(RuntimeError):
    """The request ran past its timeout and was aborted."""
