"""User text (scan names, paths, reviewer names, notes, error messages) shown as plain text.

Streamlit renders Markdown in captions, headings, alerts, table cells and radio labels; text that came
from users or files must not become links, images (fetched by every reader's browser), headings or
colours there, so every ASCII punctuation character that can open or close Markdown syntax (links,
images, emphasis, code, headings, lists, tables, HTML, maths, directives, autolinks) is backslash-escaped
(CommonMark) and line breaks are folded into spaces; quotes, commas and the like stay as they are.
"""

from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"([!#$&()*+\-./:<>\[\\\]^_`{|}~])")


def plain(value: object) -> str:
    """``value`` as Markdown that renders as exactly its text, on one line."""
    text = " ".join(str(value).split())
    return _PUNCTUATION.sub(r"\\\1", text)
