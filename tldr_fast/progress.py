"""Progress bars that suit both a terminal and a log file.

On a terminal a bar redraws in place several times a second. Where stderr is a file or a pipe (batch
jobs, CI, ``nohup``), every redraw would become a new line of the log; there the bar updates at most
once every ``LOG_INTERVAL_S`` seconds (and at the end).
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    """``tqdm(*args, **kwargs)``, throttled to one line per ``LOG_INTERVAL_S`` when its stream is not a
    terminal.

    >>> bar = progress_bar(total=3, disable=True)
    >>> bar.close()
    """
    stream = kwargs.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", LOG_INTERVAL_S)
    return tqdm(*args, **kwargs)
