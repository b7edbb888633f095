"""Markdown to safe HTML, and splitting long answers into events."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.replies.markdown import (
    DEFAULT_PART_BYTES,
    formatted_or_none,
    render_markdown,
    split_message,
)


def utf8(text: str) -> int:
    return len(text.encode("utf-8"))


# -- rendering -----------------------------------------------------------------------------


def test_markdown_becomes_html() -> None:
    html = render_markdown("# Title\n\nSome **bold** and `code`.\n\n- one\n- two")
    assert html == (
        "<h1>Title</h1>\n<p>Some <strong>bold</strong> and <code>code</code>.</p>\n"
        "<ul>\n<li>one</li>\n<li>two</li>\n</ul>"
    )


def test_raw_html_is_shown_as_text() -> None:
    html = render_markdown('<script>alert(1)</script> <img src=x onerror="alert(2)"> <b>hi</b>')
    assert "<script" not in html
    assert "<img" not in html
    assert "<b>" not in html
    assert "&lt;script&gt;" in html


def test_dangerous_links_are_not_links() -> None:
    html = render_markdown("[click](javascript:alert(1)) [data](data:text/html;base64,xx)")
    assert "href" not in html
    assert render_markdown("[ok](https://example.org/?a=1&b=2)") == (
        '<p><a href="https://example.org/?a=1&amp;b=2">ok</a></p>'
    )


def test_code_blocks_keep_their_language_and_escape_contents() -> None:
    html = render_markdown("```python\nif a < b:\n    print('<hi>')\n```")
    assert html == (
        "<pre><code class=\"language-python\">if a &lt; b:\n    print('&lt;hi&gt;')\n</code></pre>"
    )


def test_matrix_friendly_subset() -> None:
    assert render_markdown("~~gone~~") == "<p><del>gone</del></p>"
    assert render_markdown('![a cat](https://img.example/cat.png "t")') == (
        '<p><a href="https://img.example/cat.png">a cat</a></p>'
    )
    table = render_markdown("| a | b |\n|:-|-:|\n| 1 | 2 |")
    assert "<table>" in table
    assert "<td>1</td>" in table
    assert "style" not in table


def test_single_newlines_are_line_breaks() -> None:
    assert render_markdown("line one\nline two") == "<p>line one<br />\nline two</p>"


def test_plain_text_needs_no_formatted_body() -> None:
    assert formatted_or_none("Just a plain answer & nothing more.") is None
    assert formatted_or_none("A *little* emphasis") == "<p>A <em>little</em> emphasis</p>"
    # raw HTML is text either way: the plain body already shows it as typed
    assert formatted_or_none("<b>tags</b>") is None


# -- splitting -----------------------------------------------------------------------------


def test_a_short_text_is_one_part() -> None:
    assert split_message("hello") == ["hello"]
    text = "x" * DEFAULT_PART_BYTES
    assert split_message(text) == [text]


def test_paragraphs_are_preferred() -> None:
    paragraphs = [f"Paragraph {i}. " + "word " * 30 for i in range(10)]
    text = "\n\n".join(p.strip() for p in paragraphs)
    parts = split_message(text, 500)
    assert all(utf8(part) <= 500 for part in parts)
    assert all(part.startswith("Paragraph") for part in parts)
    assert "\n\n".join(parts) == text


def test_lines_then_words_then_characters() -> None:
    lines = "\n".join(f"line {i} " + "a" * 40 for i in range(20))
    parts = split_message(lines, 200)
    assert all(p.startswith("line") for p in parts)
    assert "\n".join(parts) == lines

    words = " ".join(["word"] * 200)
    parts = split_message(words, 100)
    assert all(utf8(p) <= 100 for p in parts)
    assert " ".join(parts) == words

    blob = "é" * 300  # 2 bytes each: never cut inside a character
    parts = split_message(blob, 101)
    assert all(utf8(p) <= 101 for p in parts)
    assert "".join(parts) == blob


def test_a_code_block_cut_in_two_is_closed_and_reopened() -> None:
    code = "\n".join(f"    value_{i} = compute({i})" for i in range(40))
    text = f"Here is the code:\n\n```python\n{code}\n```\n\nThat is all."
    parts = split_message(text, 400)
    assert len(parts) > 2
    for part in parts:
        assert utf8(part) <= 400
        # every part is balanced: an even number of fences
        fences = [line for line in part.split("\n") if line.startswith("```")]
        assert len(fences) % 2 == 0, part
    assert parts[1].startswith("```python\n")
    rendered = [render_markdown(part) for part in parts[1:-1]]
    assert all(r.startswith('<pre><code class="language-python">') for r in rendered)
    # the code itself survives, indentation included
    joined = "\n".join(parts)
    for i in range(40):
        assert f"    value_{i} = compute({i})" in joined


def test_limit_is_checked() -> None:
    with pytest.raises(ValueError, match="at least 64"):
        split_message("x", 10)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(["a", "b", "é", "😀", " ", "\n", "中"]), max_size=2000),
    limit=st.integers(min_value=64, max_value=700),
)
def test_split_properties(text: str, limit: int) -> None:
    parts = split_message(text, limit)
    assert all(utf8(part) <= limit for part in parts)
    # nothing but the whitespace at the cuts is lost, and order is kept
    assert "".join("".join(parts).split()) == "".join(text.split())
