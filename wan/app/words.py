"""Text of ours shown in a Markdown component, kept literal.

A message may hold a Windows path (backslashes), a file name with underscores or asterisks, or a
prompt: rendered as Markdown, ``C:\\loras`` lost its backslash and ``my_lora_v2`` turned italic.
"""

from __future__ import annotations

import re

_SPECIAL = re.compile(r"([\\`*_\[\]<>|~])")
_LINE_START = re.compile(r"^(\s*)([#+\-=>]|\d+\.)")  # a heading, list or quote when a line starts so


def literal(text: str) -> str:
    """``text`` with every Markdown-special character escaped, so the page shows it as it is; line
    breaks are kept (as Markdown line breaks)."""
    return "  \n".join(_LINE_START.sub(r"\1\\\2", _SPECIAL.sub(r"\\\1", line)) for line in str(text).split("\n"))
