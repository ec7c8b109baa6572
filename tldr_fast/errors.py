"""Errors shared across modules (a leaf module: it imports nothing from tldr_fast)."""


class BackendUnavailable(RuntimeError):
    """The requested backend or device cannot run here; the message says why and what to do."""
