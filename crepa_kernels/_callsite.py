"""Where a warning should point: the first frame outside this package and torch's module calls."""
from __future__ import annotations

import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _inside(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE) or path.endswith(os.path.join("torch", "nn", "modules", "module.py"))


def outside_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the function calling this one that names the user's
    line: past every frame of this package (a drop-in calling the loss calling the schedule) and of
    ``nn.Module.__call__``, however deep the call came in."""
    frame, level = sys._getframe(1), 1
    while frame is not None and _inside(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level
