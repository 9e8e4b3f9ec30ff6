"""The terminal channel (orchestrator/channels/console.py): approval requests printed, decided by typed /allow,
/always, /deny and /answer lines while one waits; every other line is a message."""

from __future__ import annotations

import asyncio
import dataclasses
import io

from orchestrator.channels import ActionReply, ApprovalView, CardAction, Incoming, Question
from orchestrator.channels.console import ConsoleChannel

KEY = "0123456789abcdef0123456789abcdef"
CARD = f"approval-{KEY}"
VIEW = ApprovalView(key=KEY, chat_id="console", reply_to="console-1", tool="Bash",
                    details=(("Command", "touch x\nls"),), approvers=("console",))
QUESTIONS = dataclasses.replace(VIEW, tool="AskUserQuestion", details=(), questions=(
    Question("Which database?", "Database", ("SQLite",)), Question("Tests too?", "", ("Yes", "No"))))


def settled(view: ApprovalView, outcome: str) -> ApprovalView:
    return dataclasses.replace(view, outcome=outcome, decided_by="console", decided_at=1_700_000_000.0)


def session(view: ApprovalView, typed: str, replies: list[ActionReply]) -> tuple[str, list[CardAction], list[str]]:
    """Show `view`, type the lines: what the terminal printed, the actions, the messages."""
    sink = io.StringIO()
    console = ConsoleChannel(source=io.StringIO(typed), sink=sink)
    actions: list[CardAction] = []
    messages: list[str] = []

    async def submit(message: Incoming) -> None:
        messages.append(message.text)

    async def act(action: CardAction) -> ActionReply:
        actions.append(action)
        return replies.pop(0)

    async def run() -> None:
        assert await console.show_approval(view) == CARD
        await console.run(submit, act)

    asyncio.run(run())
    return sink.getvalue(), actions, messages


def test_a_request_prints_with_how_to_answer() -> None:
    printed, _, _ = session(VIEW, "", [])
    assert printed == ("[approval] Approval needed: Bash\n  Command: touch x\n    ls\n"
                       "Answer with /allow, /always (this tool in this chat), or /deny [reason].\n")


def test_a_typed_decision_goes_to_act_and_its_toast_prints_then_lines_are_messages_again() -> None:
    printed, actions, messages = session(VIEW, "/deny not now\n/allow\nhello\n",
                                         [ActionReply("Denied: not now.", "success", settled(VIEW, "Denied: not now"))])
    assert actions == [CardAction(KEY, "deny", "console", "console", CARD, text="not now")]
    assert printed.endswith("Denied: not now.\n")
    assert messages == ["/allow", "hello"]  # nothing waits any more


def test_a_reply_that_settles_nothing_keeps_the_request_waiting() -> None:
    _, actions, messages = session(VIEW, "/answer 1\n/always\n", [
        ActionReply("That button does not fit this request.", "warning"),
        ActionReply("Always allowed in this chat: Bash.", "success", settled(VIEW, "Always allowed in this chat"))])
    assert [action.choice for action in actions] == ["answer", "always"] and not messages


def test_questions_list_numbered_options_and_a_number_picks_one() -> None:
    printed, actions, _ = session(QUESTIONS, "/answer 3\n/answer 4\n/answer PostgreSQL\n", [
        ActionReply("Noted; 1 more to answer.")] * 3)
    assert "  Database: Which database?\n    1. SQLite\n  Tests too?\n    2. Yes\n    3. No\n" in printed
    assert "/answer <number> or /answer <text>" in printed
    assert actions == [CardAction(KEY, "answer", "console", "console", CARD, question=1, option=1),
                       CardAction(KEY, "answer", "console", "console", CARD, text="4"),  # no option 4: typed
                       CardAction(KEY, "answer", "console", "console", CARD, text="PostgreSQL")]


def test_the_latest_waiting_request_is_the_one_decided() -> None:
    sink = io.StringIO()
    console = ConsoleChannel(source=io.StringIO("/allow\n"), sink=sink)
    actions: list[CardAction] = []

    async def act(action: CardAction) -> ActionReply:
        actions.append(action)
        return ActionReply("Allowed once.")

    async def run() -> None:
        first = await console.show_approval(VIEW)
        await console.show_approval(dataclasses.replace(VIEW, key="f" * 32))
        await console.update_approval(first, settled(VIEW, "Timed out: denied"))
        await console.run(lambda message: asyncio.sleep(0), act)

    asyncio.run(run())
    assert [action.key for action in actions] == ["f" * 32]
    assert "[approval] Timed out: denied by console at 22:13 UTC\n" in sink.getvalue()


def test_the_agents_control_characters_never_reach_the_terminal() -> None:
    hostile = dataclasses.replace(VIEW, details=(("Command", "rm -rf /\x1b[1A\x1b[2K\rls  # harmless\x07\x9b2J"),))
    printed, _, _ = session(hostile, "", [])
    assert "rm -rf /[1A[2Kls  # harmless2J" in printed
    assert not any((ord(c) < 32 and c != "\n") or 0x7f <= ord(c) <= 0x9f for c in printed)
