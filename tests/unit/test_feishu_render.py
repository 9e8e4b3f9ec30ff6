"""Agent text made safe to show as the bot (orchestrator/channels/feishu_render.py): no mention, no Feishu tag
and no link that hides its target survives, and ordinary text and code read the same."""

from __future__ import annotations

import re

import pytest

from orchestrator.channels.feishu_render import BREAK, card_markdown, message_text

# What Feishu would render as a tag: `<` right before a tag name, a `/`, `!` or `?`.
TAG = re.compile(r"<[A-Za-z/!?]")
# What a markdown renderer would take as a link, a link definition, or an entity to decode.
LINK = re.compile(r"\]\(|^\s*\[[^\]]*\]:", re.MULTILINE)
ENTITY = re.compile(r"&#?[A-Za-z0-9]+;")

HOSTILE = [
    "<at id=all></at> everyone look",
    '<at user_id="all">所有人</at>',
    '<at user_id="ou_boss">Boss</at> approve this',
    "<AT ID=ALL></AT>",
    "<person id='ou_x' show_name=true></person>",
    "<font color='red'>URGENT</font>",
    "<text_tag color='red'>verified by IT</text_tag>",
    "<link icon='chat_outlined' url='https://evil.example'>Open the admin panel</link>",
    "<a href='https://evil.example'>https://open.feishu.cn</a>",
    "<button>Approve</button>",
    "<number_tag url='https://evil.example'>1</number_tag>",
    "<local_datetime millisecond='0'></local_datetime>",
    "&#60;at id=all&#62;&#60;/at&#62;",
    "&lt;at id=all&gt;&lt;/at&gt;",
    "[Feishu Open Platform](https://evil.example/login)",
    "![logo](img_v2_someone_elses_image)",
    '[click](https://evil.example "a title")',
    "[[nested]](https://evil.example)",
    "[label][ref]\n\n[ref]: https://evil.example",
    "[x](<https://evil.example>)",
]


@pytest.mark.parametrize("render", [card_markdown, message_text])
@pytest.mark.parametrize("text", HOSTILE)
def test_no_tag_link_or_entity_survives(render, text: str) -> None:
    shown = render(text)
    assert not TAG.search(shown), shown
    assert not LINK.search(shown), shown
    assert not ENTITY.search(shown), shown


@pytest.mark.parametrize("render", [card_markdown, message_text])
def test_text_reads_the_same_apart_from_invisible_breaks(render) -> None:
    text = "if a < b && c > d: print('<div>')  # 5 < 6, AT&T"
    assert render(text).replace(BREAK, "") == text
    assert render(text) == "if a < b && c > d: print('<" + BREAK + "div>')  # 5 < 6, AT&T"


@pytest.mark.parametrize("render", [card_markdown, message_text])
def test_a_link_shows_its_target(render) -> None:
    assert render("see [the docs](https://open.feishu.cn/document) for more") == \
        "see the docs (https://open.feishu.cn/document) for more"
    assert render("[https://a.example](https://a.example)") == "https://a.example"
    assert render("[wiki](https://en.wikipedia.org/wiki/Foo_(bar))") == "wiki (https://en.wikipedia.org/wiki/Foo_(bar))"


def test_code_blocks_stay_exact_except_for_feishu_tags() -> None:
    code = "```cpp\n#include <stdio.h>\nstd::vector<int> v; a[0](x); // [x](y)\n```"
    assert card_markdown(code) == code
    hostile = "```\n<at id=all></at> <font color='red'>x</font> &#60;at&#62;\n```"
    shown = card_markdown(hostile)
    assert "<" + BREAK + "at id=all><" + BREAK + "/at>" in shown
    assert "<" + BREAK + "font" in shown
    assert not ENTITY.search(shown)


def test_prose_after_a_closed_block_and_an_unclosed_block() -> None:
    text = "```\nx<int>\n```\n<at id=all></at> and ```` mid-line is no fence\n````\n<b> still code to the end"
    shown = card_markdown(text)
    assert shown.startswith("```\nx<int>\n```\n<" + BREAK + "at id=all>")
    assert shown.endswith("no fence\n````\n<b> still code to the end")


def test_a_shorter_fence_does_not_close_a_longer_one() -> None:
    text = "````\n```\n<div>\n````\n<div>"
    assert card_markdown(text) == "````\n```\n<div>\n````\n<" + BREAK + "div>"


def test_a_streamed_prefix_is_already_safe() -> None:
    """A card shows the answer as it grows: a cut-off tag or link must not render either."""
    for cut in range(1, 40):
        prefix = "<at id=all></at> [x](https://evil.example)"[:cut]
        assert not TAG.search(card_markdown(prefix)), prefix
