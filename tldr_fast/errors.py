"""Errors shared across modules (a leaf module: it imports nothing from tldr_fast)."""


class BackendUnavailable(RuntimeError):
    """The requested backend or device cannot run here; the message says why and what to do."""


class NoSpaceLeft(OSError):
    """The disk (or quota) filled up while the library wrote a file: nothing was renamed into place, so
    the file that was there before is intact, and the temporary file is removed. Built as
    ``NoSpaceLeft(errno.ENOSPC, message, path)``; its text is the message alone."""

    def __str__(self) -> str:
        return str(self.strerror)
