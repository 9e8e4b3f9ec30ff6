"""Text made safe to show in Feishu with the bot's authority. Pure.

What the agent writes is hostile input (anyone in the chat, or a prompt injection, controls it), and the bot
shows it: in a card's markdown Feishu renders its own tags (`<at id=all></at>` mentions everyone, `<person>`,
`<font>`, `<link url=…>`, `<text_tag>`, `<a href=…>`, …) and links whose text hides their target
(`[your invoice](https://evil)`); a text message renders `<at user_id="all"></at>` and links too. So, before
text leaves for Feishu:

- every `<` that could open a tag (a letter, `/`, `!` or `?` right after it) gets a zero-width space after
  it: no parser sees a tag, and it reads the same (`<div>` still shows as <div>). Chosen over the `&#60;`
  entity, which shows literally wherever Feishu does not decode entities (code blocks, text messages); the
  space is invisible everywhere. Entities the text itself contains (`&#60;at …`) are broken the same way,
  after their `&`, so no renderer can decode them into a tag.
- a link `[text](url)` or image `![alt](key)` becomes `text (url)`, so its target is visible, and whatever
  link syntax is left (`](`, a `[label]:` definition) is broken with the same space.
- inside a fenced code block (```), only Feishu's own tags and entities are broken, and links are left
  alone: code copied from a card stays exact (`#include <stdio.h>`, `List<String>`, `a[i](x)`). Mentions
  must not depend on Feishu's renderer treating code as code.
"""

from __future__ import annotations

import re

BREAK = "\u200b"  # zero-width space
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")
# Feishu's own markdown tags (card JSON 2.0 rich text), and the HTML ones that link or embed.
_FEISHU_TAG = re.compile(r"<(?=/?\s*(?:at|person|font|link|a|text_tag|number_tag|local_datetime|img|button)\b)",
                         re.IGNORECASE)
_ENTITY = re.compile(r"&(?=#?[A-Za-z0-9]{1,10};)")
_LINK = re.compile(r"!?\[([^\[\]\n]*)\]\(\s*<?([^\s()<>]*(?:\([^\s()<>]*\)[^\s()<>]*)*)>?"
                   r"""(?:\s+(?:"[^"\n]*"|'[^'\n]*'))?\s*\)""")
_LINK_LEFTOVER = re.compile(r"\](?=[(:])")
_FENCE = re.compile(r"^ {0,3}(`{3,})[^`\n]*$", re.MULTILINE)


def card_markdown(text: str) -> str:
    """`text` for a card's markdown element: prose and code blocks each made safe their own way."""
    return "".join(_code(part) if is_code else _prose(part) for part, is_code in _fenced(text))


def message_text(text: str) -> str:
    """`text` for a text message (no code blocks there: all of it is prose)."""
    return _prose(text)


def _prose(text: str) -> str:
    text = _LINK.sub(_visible_link, text)
    text = _LINK_LEFTOVER.sub("]" + BREAK, text)
    return _ENTITY.sub("&" + BREAK, _TAG_START.sub("<" + BREAK, text))


def _code(text: str) -> str:
    return _ENTITY.sub("&" + BREAK, _FEISHU_TAG.sub("<" + BREAK, text))


def _visible_link(match: re.Match[str]) -> str:
    label, target = match.group(1).strip(), match.group(2)
    return target if label in ("", target) else f"{label} ({target})"


def _fenced(text: str) -> list[tuple[str, bool]]:
    """(part, is_code) in order: a fence of three or more backticks opens a block that a fence at least as long
    closes, or the end of the text does (as in CommonMark); the fence lines belong to the block."""
    parts: list[tuple[str, bool]] = []
    position = 0
    while (opening := _FENCE.search(text, position)) is not None:
        parts.append((text[position:opening.start()], False))
        closing = re.compile(rf"^ {{0,3}}`{{{len(opening.group(1))},}}[ \t]*$", re.MULTILINE)
        found = closing.search(text, opening.end())
        end = found.end() if found else len(text)
        parts.append((text[opening.start():end], True))
        position = end
    parts.append((text[position:], False))
    return [(part, is_code) for part, is_code in parts if part]
