"""Approval cards (orchestrator/channels/feishu_render.approval_card): buttons that carry the approval's key while
it waits and none once settled, the agent's text unable to mention, link or close its code block, and the card
under Feishu's 30 KB however much the agent wrote."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.channels import ApprovalView, Question
from orchestrator.channels.feishu_render import BUTTON_CHARS, CARD_BYTES, approval_card

KEY = "0123456789abcdef0123456789abcdef"
VIEW = ApprovalView(key=KEY, chat_id="oc_a", reply_to="om_1", tool="Bash",
                    details=(("Command", "touch /workspace/x"), ("Description", "make a file")),
                    approvers=("ou_alice", "ou_bob"))
QUESTIONS = dataclasses.replace(VIEW, tool="AskUserQuestion", details=(), questions=(
    Question("Which database?", "Database", ("SQLite", "PostgreSQL")), Question("Tests too?", "", ("Yes", "No"))))
SETTLED = dataclasses.replace(VIEW, outcome="Allowed once", decided_by="ou_alice", decided_at=1_700_000_000.0)
# What Feishu would render as a mention or a tag, a link, or an entity to decode.
TAG = re.compile(r"<[A-Za-z/!?]")
LINK = re.compile(r"\]\(")
ENTITY = re.compile(r"&#?[A-Za-z0-9]+;")
FENCE = re.compile(r"^ {0,3}(`{3,})", re.MULTILINE)
CODE_BLOCK = re.compile(r"^```\n.*?^```$", re.MULTILINE | re.DOTALL)


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every object in a card, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def tagged(card: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return [node for node in walk(card["body"]) if node.get("tag") == tag]


def texts(card: dict[str, Any]) -> list[str]:
    """Every text a card shows: its markdown, its plain texts (header, buttons, placeholders), its summary."""
    return [str(node["content"]) for node in walk(card) if "content" in node]


def buttons(card: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name → (label, the value the click sends)."""
    """By name without the key (which every name carries too: a click without its value still says what it does)."""
    assert all(f"-{button['behaviors'][0]['value']['approval']}" in button["name"] for button in tagged(card, "button"))
    return {button["name"].replace(f"-{button['behaviors'][0]['value']['approval']}", ""):
            {"label": button["text"]["content"], **button["behaviors"][0]["value"]}
            for button in tagged(card, "button")}


def size(card: dict[str, Any]) -> int:
    return len(json.dumps(card, ensure_ascii=False).encode())


def test_a_waiting_request_has_a_form_with_its_buttons_each_carrying_the_key() -> None:
    card = approval_card(VIEW)
    assert card["schema"] == "2.0" and card["config"]["update_multi"] is True
    assert card["header"]["title"]["content"] == "Approval needed: Bash" and card["header"]["template"] == "orange"
    assert buttons(card) == {
        "allow": {"label": "Allow once", "approval": KEY, "choice": "allow"},
        "always": {"label": "Always allow Bash here", "approval": KEY, "choice": "always"},
        "deny": {"label": "Deny", "approval": KEY, "choice": "deny"}}
    [form] = tagged(card, "form")
    assert form["name"] == "decision" and all(b["form_action_type"] == "submit" for b in tagged(card, "button"))
    [field] = tagged(card, "input")
    assert field["name"] == "text" and field["placeholder"]["content"] == "Reason to deny (optional)"
    shown = "\n".join(texts(card))
    assert "Claude wants to run a command" in shown and "touch /workspace/x" in shown and "make a file" in shown
    assert "<at id=ou_alice></at> <at id=ou_bob></at>" in shown


def test_a_question_has_a_button_per_option_and_a_typed_answer() -> None:
    card = approval_card(QUESTIONS)
    assert buttons(card) == {
        "answer-0-0": {"label": "SQLite", "approval": KEY, "choice": "answer", "question": 0, "option": 0},
        "answer-0-1": {"label": "PostgreSQL", "approval": KEY, "choice": "answer", "question": 0, "option": 1},
        "answer-1-0": {"label": "Yes", "approval": KEY, "choice": "answer", "question": 1, "option": 0},
        "answer-1-1": {"label": "No", "approval": KEY, "choice": "answer", "question": 1, "option": 1},
        "answer": {"label": "Send typed answer", "approval": KEY, "choice": "answer"},
        "deny": {"label": "Decline to answer", "approval": KEY, "choice": "deny"}}
    assert tagged(card, "input")[0]["placeholder"]["content"] == "Or type an answer"
    shown = "\n".join(texts(card))
    assert "**Database:**\nWhich database?" in shown and "Tests too?" in shown


def test_option_labels_are_bounded() -> None:
    card = approval_card(dataclasses.replace(QUESTIONS, questions=(Question("Pick", "", ("x" * 5000,)),)))
    assert len(buttons(card)["answer-0-0"]["label"]) == BUTTON_CHARS + 1  # and an ellipsis


def test_a_settled_request_shows_its_outcome_and_no_buttons() -> None:
    card = approval_card(SETTLED)
    assert not tagged(card, "form") and not tagged(card, "button") and not tagged(card, "input")
    assert card["header"]["title"]["content"] == "Allowed once" and card["header"]["template"] == "green"
    assert "Allowed once by <at id=ou_alice></at> at 22:13 UTC" in texts(card)
    assert "touch /workspace/x" in "\n".join(texts(card))
    timed_out = approval_card(dataclasses.replace(SETTLED, outcome="Timed out: denied", decided_by=None))
    assert "Timed out: denied at 22:13 UTC" in texts(timed_out)


@pytest.mark.parametrize(("outcome", "colour"), [
    ("Allowed once", "green"), ("Always allowed in this chat: Bash", "green"), ("Answered: SQLite", "green"),
    ("Allowed: always allowed in this chat", "green"), ("Denied: too risky", "red"), ("Timed out: denied", "red"),
    ("No longer needed: the answer ended", "grey")])
def test_the_header_colour_follows_the_outcome(outcome: str, colour: str) -> None:
    assert approval_card(dataclasses.replace(SETTLED, outcome=outcome))["header"]["template"] == colour


def test_only_open_ids_become_mentions() -> None:
    view = dataclasses.replace(VIEW, approvers=("ou_ok", "all", "ou_x></at><at id=all", "", "ou_"))
    mentions = re.findall(r"<at id=([^>]*)>", "\n".join(texts(approval_card(view))))
    assert mentions == ["ou_ok"]
    settled = dataclasses.replace(SETTLED, approvers=(), decided_by="all")
    assert "Allowed once at 22:13 UTC" in texts(approval_card(settled))


HOSTILE = "<at id=all></at> [Open the admin panel](https://evil.example) &#60;at id=all&#62; <font color='red'>x</font>"


def test_the_agents_text_cannot_mention_link_or_tag_anywhere_on_the_card() -> None:
    view = ApprovalView(key=KEY, chat_id="oc_a", reply_to="om_1", tool=f"mcp__x{HOSTILE}",
                        details=(("Command", HOSTILE), ("URL", HOSTILE), ("File", f"{HOSTILE}\n{HOSTILE}")),
                        approvers=("ou_alice",), questions=(Question(HOSTILE, HOSTILE, (HOSTILE,)),))
    for card in (approval_card(view), approval_card(dataclasses.replace(view, outcome=f"Denied: {HOSTILE}"))):
        for text in texts(card):
            text = text.replace("<at id=ou_alice></at>", "")
            assert not TAG.search(text) and not ENTITY.search(text), text
            # links are left alone in code, where markdown shows them as text (and a copied command stays exact)
            assert not LINK.search(CODE_BLOCK.sub("", text)), text


@pytest.mark.parametrize("command", ["a\n```\n<at id=all></at>\n```\nb", "````", "x ``` y", "`", "```\n" * 50])
def test_code_cannot_close_its_fenced_block(command: str) -> None:
    [detail] = [text for text in texts(approval_card(dataclasses.replace(VIEW, details=(("Command", command),))))
                if text.startswith("**Command:**")]
    assert [match.group(1) for match in FENCE.finditer(detail)] == ["```", "```"]  # its own fences only
    assert detail.endswith("\n```") and not TAG.search(detail)


@pytest.mark.parametrize("unit", ["<a", "\x01", "漢", "😀", "`", "&#60;", "\n"])
def test_a_card_stays_under_30_kb_however_much_the_agent_wrote(unit: str) -> None:
    megabyte = unit * (1024 * 1024 // len(unit.encode()))
    view = dataclasses.replace(VIEW, tool=megabyte, details=tuple((label, megabyte) for label in (
        "Command", "Description", "File", "Diff", "Content", "URL", "Prompt", "Query", "Input", "Problem", "More")),
        approvers=tuple(f"ou_{n:032x}" for n in range(100)))
    questions = dataclasses.replace(view, questions=tuple(Question(megabyte, megabyte, (megabyte,) * 50)
                                                          for _ in range(10)))
    for shown in (view, questions, dataclasses.replace(questions, outcome=megabyte, decided_by="ou_a",
                                                       decided_at=0.0)):
        card = approval_card(shown)
        assert size(card) <= CARD_BYTES
        assert buttons(card) or shown.outcome is not None  # still a card one can decide with


def test_an_ordinary_card_is_not_cut() -> None:
    command = "\n".join(f"echo line {n}" for n in range(200))  # 2.5 KB
    card = approval_card(dataclasses.replace(VIEW, details=(("Command", command),)))
    assert "echo line 199" in "\n".join(texts(card))
