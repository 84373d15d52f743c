"""What the terminal shows: names and messages on one safe line each, and progress bars on stderr.

Text for people (and every message on the terminal) shows each name on one line (:func:`printable`):
control characters are escaped (``\\n``, ``\\t``, ``\\u001b``), a byte that was not UTF-8 is ``\\xNN``,
a backslash is doubled, and a URL's user name and password are replaced by ``***``.
"""

from __future__ import annotations

import sys
from typing import Any

from .processing.fetch import redact

_SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object, *, backslashes: bool = True, lines: bool = False) -> str:
    """``text`` safe on one line of a terminal or a text file (see the module docstring); never raises.

    ``backslashes=False`` leaves backslashes alone: for a message that may quote names already escaped.
    ``lines=True`` keeps its newlines: a message of several lines, each made safe.
    """
    text = redact(str(text))
    if text.isprintable() and (not backslashes or "\\" not in text):
        return text
    shown = []
    for char in text:
        code = ord(char)
        if (char == "\\" and not backslashes) or (char == "\n" and lines):
            shown.append(char)
        elif char in _SHORT_ESCAPES:
            shown.append(_SHORT_ESCAPES[char])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            shown.append(f"\\x{code - 0xDC00:02x}")
        elif not char.isprintable():
            shown.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            shown.append(char)
    return "".join(shown)


def progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr counting images, or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr)
