"""The OpenAI-compatible HTTP layer (``pyvl serve``); owns no model state. Needs the ``serve`` extra."""

from .app import ServeSettings, create_app
from .media import MediaPolicy

__all__ = ["ServeSettings", "MediaPolicy", "create_app"]
