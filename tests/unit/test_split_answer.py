"""Long answers cut into pieces that each fit and render (feishu_render.split_answer)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.channels.feishu_render import split_answer


def words(text: str) -> str:
    """The text without fence lines (the split only adds those) and without whitespace (it only cuts at it, or
    anywhere in a line too long to cut at it)."""
    return re.sub(r"\s+", "", "\n".join(line for line in text.split("\n") if not FENCE_LINE.match(line)))


def balanced(piece: str) -> bool:
    return sum(1 for line in piece.split("\n") if FENCE_LINE.match(line)) % 2 == 0


FENCE_LINE = re.compile(r"[ \t]{0,3}(`{3,}|~{3,})")


def test_a_short_answer_is_one_piece() -> None:
    assert split_answer("hello", 100) == ["hello"]


def test_cuts_prefer_paragraph_breaks() -> None:
    first, second = "a" * 60, "b" * 60
    text = f"{first}\nline two of the first\n\n{second}"
    pieces = split_answer(text, 100)
    assert pieces == [f"{first}\nline two of the first", second]


def test_a_code_block_cut_in_two_is_closed_and_opened_again_with_its_language() -> None:
    code = "\n".join(f"print({n})" for n in range(40))
    pieces = split_answer(f"Here:\n```python\n{code}\n```\nDone.", 120)
    assert len(pieces) > 2 and all(len(piece) <= 120 for piece in pieces)
    assert all(balanced(piece) for piece in pieces), pieces  # each renders: every block it opens, it closes
    assert all(piece.startswith("```python\n") for piece in pieces[1:-1])
    assert pieces[-1].endswith("```\nDone.")


def test_a_200_kb_answer_arrives_whole_and_in_order() -> None:
    paragraphs = [f"Paragraph {n}: " + "words " * 40 for n in range(600)]
    text = "\n\n".join(paragraphs)
    assert len(text) > 140_000
    pieces = split_answer(text, 8000)
    assert all(len(piece) <= 8000 for piece in pieces)
    assert "\n\n".join(pieces) == text  # cut only at paragraph breaks, nothing lost, in order


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["word ", "\n", "\n\n", "```py\n", "```\n", "x" * 50, "~~~\n"]), max_size=200),
       st.integers(min_value=40, max_value=400))
def test_every_piece_fits_and_nothing_is_lost(parts: list[str], limit: int) -> None:
    text = "".join(parts)
    pieces = split_answer(text, limit)
    assert all(len(piece) <= limit for piece in pieces)
    assert "".join(words(piece) for piece in pieces) == words(text)  # nothing lost, in order


def test_a_cut_inside_a_line_never_starts_a_piece_with_tildes_either() -> None:
    # Found by the property above (CI): "x~~~" cut just before its tildes started a piece with a tilde fence.
    text = "```\n```\n```\n```\n" + "x" * 50 + "```\n" + "x" * 50 + "~~~\n"
    pieces = split_answer(text, 60)
    assert "".join(words(piece) for piece in pieces) == words(text)
    assert not any(piece.startswith("~~~") for piece in pieces)


def test_a_cut_inside_a_line_never_starts_a_piece_with_a_fence() -> None:
    # Found by the property above: "x```py" mid-line is text; cut just before its backticks it opened a code block.
    text = "word word ```\n" + "x" * 100 + "```\n" + "x" * 50 + "```py\n"
    pieces = split_answer(text, 84)
    assert "".join(words(piece) for piece in pieces) == words(text)
    assert not any(piece.startswith("```") for piece in pieces)  # no block is open anywhere in this text
