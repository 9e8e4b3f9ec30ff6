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

Approval cards (`approval_card`) are built here too: what the agent asks for is shown with this escaping, the
agent's code in fenced blocks it cannot close, and the card is cut to fit Feishu's 30 KB however much the agent
wrote.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from orchestrator.channels import ApprovalView, Question
from orchestrator.channels.feishu_events import is_open_id

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


# ---- approval cards (card JSON 2.0) ----

CARD_BYTES = 28 * 1024  # Feishu refuses a card over 30 KB of JSON; the rest is room for the message around it
AGENT_TEXT_CHARS = 6000  # of the agent's text on one card; cut harder while the card's JSON is still too big
DETAIL_CHARS = 3000  # of one detail (a command, a diff)
QUESTION_CHARS = 1000  # of one question, with its header
OUTCOME_CHARS = 1000  # of the outcome line (a typed reason or answer)
TITLE_CHARS = 100  # of the header's title
TOOL_CHARS = 60  # of the tool's name
BUTTON_CHARS = 40  # of a button's label
INPUT_CHARS = 1000  # the most Feishu's input field takes
MAX_DETAILS, MAX_QUESTIONS, MAX_OPTIONS, MAX_APPROVERS = 10, 4, 8, 20
# Shown in a fenced block (as code) also when they fit on one line; any text that does not is shown so too.
CODE_LABELS = frozenset({"Command", "Content", "Diff", "Input", "Source"})
_BACKTICK_RUN = re.compile(r"`(?=`)")
_LINE_BREAK = re.compile("[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")  # what str.splitlines splits at
INTROS = {"Bash": "Claude wants to run a command", "Write": "Claude wants to write a file",
          "Edit": "Claude wants to edit a file", "MultiEdit": "Claude wants to edit a file",
          "NotebookEdit": "Claude wants to edit a notebook", "WebFetch": "Claude wants to fetch a web page",
          "WebSearch": "Claude wants to search the web", "AskUserQuestion": "Claude asks"}
# The header's colour by how the outcome (approvals.Approvals.outcome) begins; any other outcome is a denial.
OUTCOME_TEMPLATES = (("Allowed", "green"), ("Always allowed", "green"), ("Answered", "green"),
                     ("No longer needed", "grey"))


class _Room:
    """What is left of a card's allowance for the agent's text; each text is cut to fit it."""

    def __init__(self, chars: int) -> None:
        self.chars = chars

    def cut(self, text: str, most: int) -> str:
        keep = max(0, min(most, self.chars))
        self.chars -= min(len(text), keep)
        return text if len(text) <= keep else text[:keep] + "…"


def approval_card(view: ApprovalView) -> dict[str, Any]:
    """The card of an approval: the request, who may decide and, while it waits, a form with its buttons (each
    carrying the approval's key); once settled, the outcome instead. Its JSON stays under CARD_BYTES however long
    the agent's text (cut harder until it does)."""
    chars = AGENT_TEXT_CHARS
    while True:
        card = _approval_card(view, _Room(chars))
        if chars == 0 or len(json.dumps(card, ensure_ascii=False).encode()) <= CARD_BYTES:
            return card
        chars //= 4


def _approval_card(view: ApprovalView, room: _Room) -> dict[str, Any]:
    tool = room.cut(view.tool, TOOL_CHARS)
    title = f"Approval needed: {tool}" if view.outcome is None else room.cut(view.outcome, TITLE_CHARS)
    template = "orange" if view.outcome is None else _template(view.outcome)
    elements = [_markdown(f"{card_markdown(INTROS.get(view.tool, f'Claude wants to use {tool}'))}:")]
    elements += [_markdown(_detail(label, room.cut(text, DETAIL_CHARS))) for label, text in view.details[:MAX_DETAILS]]
    if view.outcome is None:
        elements += [_markdown(_approvers(view.approvers)), _form(view, tool, room)]
    else:
        elements += [_markdown(_question(question, room)) for question in view.questions[:MAX_QUESTIONS]]
        elements.append(_markdown(_settled(view, room)))
    return {"schema": "2.0",
            "config": {"update_multi": True, "summary": {"content": message_text(title)}},
            "header": {"title": {"tag": "plain_text", "content": message_text(title)}, "template": template},
            "body": {"elements": elements}}


def _form(view: ApprovalView, tool: str, room: _Room) -> dict[str, Any]:
    """The buttons (a form, so a click sends the text field along) while the approval waits."""
    elements: list[dict[str, Any]] = []
    for number, question in enumerate(view.questions[:MAX_QUESTIONS]):
        elements.append(_markdown(_question(question, room)))
        elements += [_button(room.cut(option, BUTTON_CHARS), "default", view.key, "answer", question=number,
                             option=index)
                     for index, option in enumerate(question.options[:MAX_OPTIONS])]
    placeholder = "Or type an answer" if view.questions else "Reason to deny (optional)"
    elements.append({"tag": "input", "name": "text", "max_length": INPUT_CHARS,
                     "placeholder": {"tag": "plain_text", "content": placeholder}})
    if view.questions:
        elements += [_button("Send typed answer", "primary", view.key, "answer"),
                     _button("Decline to answer", "danger", view.key, "deny")]
    else:
        elements += [_button("Allow once", "primary", view.key, "allow"),
                     _button(f"Always allow {tool} here", "default", view.key, "always"),
                     _button("Deny", "danger", view.key, "deny")]
    return {"tag": "form", "name": "decision", "elements": elements}


def button_name(key: str, choice: str, question: int | None = None, option: int | None = None) -> str:
    """A button's name carries what its value does (`allow-<key>`, `answer-<key>-0-1`): a form's submit sends its
    button's name in any case, and its value has been reported missing (feishu_events.parse_card_action reads both)."""
    return "-".join([choice, key, *([str(question), str(option)] if question is not None else [])])


def _button(label: str, kind: str, key: str, choice: str, **picked: int) -> dict[str, Any]:
    name = button_name(key, choice, picked.get("question"), picked.get("option"))
    return {"tag": "button", "name": name, "text": {"tag": "plain_text", "content": message_text(label)},
            "type": kind, "form_action_type": "submit",
            "behaviors": [{"type": "callback", "value": {"approval": key, "choice": choice, **picked}}]}


def _markdown(content: str) -> dict[str, Any]:
    return {"tag": "markdown", "content": content}


def _detail(label: str, text: str) -> str:
    """`**Label:** text`, or the text as code in a fenced block that nothing in it can close: every run of
    backticks in it is broken, so no fence (of any length) can form."""
    if label in CODE_LABELS or "`" in text or _LINE_BREAK.search(text):
        return f"**{card_markdown(label)}:**\n" + card_markdown(f"```\n{_BACKTICK_RUN.sub('`' + BREAK, text)}\n```")
    return f"**{card_markdown(label)}:** {card_markdown(text)}"


def _question(question: Question, room: _Room) -> str:
    header = room.cut(question.header, BUTTON_CHARS)
    text = card_markdown(room.cut(question.text, QUESTION_CHARS))
    return f"**{card_markdown(header)}:**\n{text}" if header else text  # its own line: a fence it opens stays one


def _approvers(approvers: tuple[str, ...]) -> str:
    mentions = [f"<at id={open_id}></at>" for open_id in approvers if is_open_id(open_id)][:MAX_APPROVERS]
    return f"Who may decide: {' '.join(mentions)}" if mentions else "Who may decide: this chat's approvers"


def _settled(view: ApprovalView, room: _Room) -> str:
    line = card_markdown(room.cut(view.outcome or "", OUTCOME_CHARS))
    if is_open_id(view.decided_by):
        line += f" by <at id={view.decided_by}></at>"
    if view.decided_at is not None:
        line += time.strftime(" at %H:%M UTC", time.gmtime(view.decided_at))
    return line


def _template(outcome: str) -> str:
    return next((colour for start, colour in OUTCOME_TEMPLATES if outcome.startswith(start)), "red")


# ---- long answers ----------------------------------------------------------------------------------------

_FENCE_LINE = re.compile(r" {0,3}(`{3,})[^`\n]*")  # a whole line that opens or closes a block, as card_markdown reads


def split_answer(text: str, limit: int) -> list[str]:
    """Pieces of at most `limit` characters that say all of `text`, in order: each cut at a paragraph break in its
    second half where there is one, else at a line break, else where it must; a piece cut inside a code block
    closes it, and the next one opens it again with the same fence line (its language too), so each renders."""
    pieces: list[str] = []
    reopen = ""
    while len(reopen) + len(text) > limit:
        piece, rest = _piece(reopen, text, limit - len(reopen))
        fence = _open_fence(piece)
        if fence is not None and len(piece) + 1 + len(_FENCE_LINE.fullmatch(fence)[1]) > limit:  # type: ignore[index]
            piece, rest = _piece(reopen, text, limit - len(reopen) - _FENCE_ROOM)  # room for the closing fence
            fence = _open_fence(piece)
        pieces.append(f"{piece}\n{_FENCE_LINE.fullmatch(fence)[1]}" if fence else piece)  # type: ignore[index]
        text = rest
        reopen = f"{fence.strip()}\n" if fence else ""
    return [*pieces, reopen + text]


_FENCE_ROOM = 24  # what closing a fence costs a piece (a newline and a fence), with room for a long fence


def _piece(reopen: str, text: str, room: int) -> tuple[str, str]:
    """The next piece (after the reopened fence, if any) and the text left."""
    cut = _cut(text, max(1, room))
    return reopen + text[:cut].rstrip("\n"), text[cut:].lstrip("\n")


def _cut(text: str, room: int) -> int:
    for separator in ("\n\n", "\n"):
        at = text.rfind(separator, room // 2, room)
        if at > 0:
            return at
    cut = room
    while cut > 1 and _FENCE_START.match(text, cut):  # a cut inside a line must not start the next piece with a
        cut -= 1  # fence: "x```py" mid-line is text, and would become a code block's opening line
    return cut


# Tildes too: card_markdown opens blocks with backticks only, but a piece that starts with "~~~" (cut from "x~~~")
# would read as a fence to other markdown (found by test_every_piece_fits_and_nothing_is_lost).
_FENCE_START = re.compile(r" {0,3}(`{3,}|~{3,})")


def _open_fence(text: str) -> str | None:
    """The fence line of a code block still open at the end of `text`, or None. A block closes at a line of as many
    backticks or more, and nothing else (as card_markdown reads it)."""
    opened: str | None = None
    ticks = 0
    for line in text.split("\n"):
        match = _FENCE_LINE.fullmatch(line)
        if match is None:
            continue
        if opened is None:
            opened, ticks = line, len(match[1])
        elif line.strip() == match[1] and len(match[1]) >= ticks:
            opened = None
    return opened


# Feishu's file upload types besides "stream" (any file), by extension. mp4 and opus are left as "stream": as their
# own types they must be sent as media or audio messages, which need a duration and a cover.
_UPLOAD_TYPES = {"pdf": "pdf", "doc": "doc", "docx": "doc", "xls": "xls", "xlsx": "xls", "ppt": "ppt", "pptx": "ppt"}


def upload_file_type(name: str) -> str:
    """The `file_type` of a file upload, from its name."""
    extension = name.rpartition(".")[2].lower() if "." in name else ""
    return _UPLOAD_TYPES.get(extension, "stream")

