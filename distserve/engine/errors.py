"""Errors the engine raises to its users (and the HTTP server turns into status codes)."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The request could not be served: an instance holding it died, or none is alive to take
    it. The message says which."""
