"""Exceptions raised by pyvl. Every message names the file, key, shape or value at fault and what was expected."""

__all__ = ["PyvlError", "ConfigError", "CheckpointError", "ImageError", "PromptError", "WorkerError"]


class PyvlError(Exception):
    """Base class of every error pyvl raises on bad input."""


class ConfigError(PyvlError, ValueError):
    """config.json (or a tokenizer/generation config file) is missing, malformed or contradictory."""


class CheckpointError(PyvlError, ValueError):
    """Weights cannot be loaded: missing shard, corrupt header, wrong key set or shape, pickle file."""


class ImageError(PyvlError, ValueError):
    """An image cannot be opened or preprocessed, or a preprocessing argument is out of range."""


class PromptError(PyvlError, ValueError):
    """A prompt is inconsistent with its images or does not fit the model's context."""


class WorkerError(PyvlError, RuntimeError):
    """A tensor-parallel rank died, hung, failed to start or to load: the model cannot serve (load it again)."""
