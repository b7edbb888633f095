"""Answers as Matrix messages: Markdown to safe HTML, long answers split into events.

A model answers in Markdown. The plain text stays the ``body``; `render_markdown` makes
the ``formatted_body`` with markdown-it-py (CommonMark, raw HTML off: any ``<tag>`` in an
answer is shown as text, and link targets such as ``javascript:`` are refused). The
output keeps to the HTML subset the Matrix spec recommends: strikethrough is ``<del>``,
images become links (only ``mxc://`` images would display), and table cells carry no
``style``.

An event is at most 65,536 bytes of JSON, and an edit carries its text twice; so an
answer is split (`split_message`) into bodies of at most `DEFAULT_PART_BYTES` bytes of
UTF-8, at paragraph, line or word boundaries, and a code block cut in two is closed at
the end of one part and reopened at the start of the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml
from markdown_it.renderer import RendererHTML
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict

from ..backends.bounded_read import fence_after

__all__ = ["DEFAULT_PART_BYTES", "formatted_or_none", "render_markdown", "split_message"]

DEFAULT_PART_BYTES = 30_000


def _image_as_link(
    self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    token = tokens[idx]
    src = escapeHtml(str(token.attrGet("src") or ""))
    alt = escapeHtml(self.renderInlineAsText(token.children or [], options, env)) or src
    return f'<a href="{src}">{alt}</a>'


def _without_style(
    self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    tokens[idx].attrs.pop("style", None)
    return self.renderToken(tokens, idx, options, env)


def _tag(html: str) -> Any:
    def render(
        self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
    ) -> str:
        return html

    return render


def _make_renderer() -> MarkdownIt:
    # breaks: a single newline is a line break, as chat writers (and models) mean it.
    md = MarkdownIt("commonmark", {"html": False, "breaks": True})
    md.enable(["table", "strikethrough"])
    md.add_render_rule("image", _image_as_link)
    md.add_render_rule("s_open", _tag("<del>"))
    md.add_render_rule("s_close", _tag("</del>"))
    for name in ("th_open", "td_open"):
        md.add_render_rule(name, _without_style)
    return md


_MD = _make_renderer()


def render_markdown(text: str) -> str:
    """``text`` (Markdown) as HTML safe for a ``formatted_body``; raw HTML is escaped."""
    html: str = _MD.render(text)
    return html.strip()


def formatted_or_none(text: str) -> str | None:
    """The ``formatted_body`` for ``text``, or None when the HTML would say nothing more
    than the plain text (one plain paragraph)."""
    html = render_markdown(text)
    if html == f"<p>{escapeHtml(text.strip())}</p>":
        return None
    return html


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _cut(text: str, budget: int) -> tuple[int, int]:
    """Where to end a part of ``text`` that has ``budget`` bytes: (end of this part,
    start of the rest). Prefers a paragraph break, then a line break, then a space, in
    the second half of the room; else cuts at the last whole character that fits."""
    fits = len(text.encode("utf-8")[:budget].decode("utf-8", "ignore"))
    window = text[:fits]
    floor = fits // 2
    for separator in ("\n\n", "\n", " "):
        at = window.rfind(separator, floor)
        if at > 0:
            return at, at + len(separator)
    return max(fits, 1), max(fits, 1)


def split_message(text: str, limit: int = DEFAULT_PART_BYTES) -> list[str]:
    """``text`` as parts of at most ``limit`` bytes of UTF-8 each, in order.

    Cuts at paragraph breaks, else line breaks, else spaces, else between characters;
    the break itself is dropped. A fenced code block cut by a part's end is closed there
    and reopened (same fence and language) at the start of the next part. A text that
    fits is returned whole, as the only part. Raises ValueError for a ``limit`` under 64.
    """
    if limit < 64:
        raise ValueError("limit must be at least 64 bytes")
    if _utf8_len(text) <= limit:
        return [text]
    parts: list[str] = []
    rest = text
    fence: tuple[str, str] | None = None
    while rest:
        prefix = f"{fence[0]}{fence[1]}\n" if fence is not None else ""
        if _utf8_len(prefix) > limit // 4:
            prefix = f"{fence[0]}\n" if fence is not None else ""
        if _utf8_len(prefix + rest) <= limit:
            parts.append(prefix + rest)
            break
        budget = limit - _utf8_len(prefix)
        while True:
            end, start = _cut(rest, budget)
            piece = rest[:end]
            still_open = fence_after(piece, fence)
            closing = f"\n{still_open[0]}" if still_open is not None else ""
            part = prefix + piece.rstrip(" ") + closing
            overflow = _utf8_len(part) - limit
            if overflow <= 0 or budget <= overflow + 1:
                break
            budget -= overflow
        if part.strip():
            parts.append(part)
        rest = rest[start:]
        if still_open is None:
            rest = rest.lstrip("\n")
        fence = still_open
    return parts
