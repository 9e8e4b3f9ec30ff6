"""Approvals: the CLI's permission requests decided by people in the chat.

A chat whose `permission_mode` asks (anything but bypassPermissions) runs its CLI with the permission prompts on
stdio; the agent host writes each request into the turn's folder (`ask-<n>`) and waits. Here, for each:

    seen by the turn's follower ─► stored (pending, with a deadline) ─► a card in the chat (Channel.show_approval)
       ─► a click (Channel → `act`): a known card, still pending, from an approver ─► decided once (the store's
          conditional update: two approvers clicking at once give one decision), the clicker's card updated
       ─► the follower writes the decision for the host (`<turn>.decision-<n>` in root's input folder)

or decided without a card: a tool the chat allowed for good ("Always allow"), a request that cannot be read. A
request nobody decides within `approval_timeout` is denied; one whose turn ended is cancelled; a planned shutdown
denies what waits. Every request and decision is a row of the store (the audit trail). The requests are the
agent's to write, so nothing in one is trusted: it is read with bounds, shown escaped, and a forged one can at
most ask a person a question (its decision answers nothing the CLI asked).

Everything here runs on the service's event loop; the store's writes are synchronous, so two clicks handled one
after the other see each other's decision.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from orchestrator import agent_host, metrics, turns
from orchestrator.channels import ActionReply, ApprovalView, CardAction, Channel, DeliveryFailed, Question
from orchestrator.config import Settings, resolve_chat
from orchestrator.masking import Masker
from orchestrator.states import State
from orchestrator.store import ApprovalRecord, MessageRecord, Store
from orchestrator.untrusted import excerpt

MAX_ASKS_PER_TURN = 100  # a turn asking more than this is forging requests: it is stopped
ASKS_PER_LOOK = 10  # new requests taken per look, so a flood of forged ones cannot hold the follower
DETAIL_CHARS = 1500  # characters of one detail shown on a card
DETAILS_CHARS = 4000  # of all of them
QUESTION_CHARS = 1000  # the answer goes back keyed by the question's text: longer ones are cut, and go unanswered
OPTION_CHARS = 100
MAX_QUESTIONS = 4
MAX_OPTIONS = 8
ANSWER_CHARS = 2000
DIFF_EDITS, DIFF_LINES = 5, 10  # of an Edit's diff on a card: edits, and lines per side of each
RETRY_SECONDS = 5.0  # a card that could not be sent or updated is tried again after this
ASK_USER = "AskUserQuestion"
OUTCOME_WORDS = {"allowed": "Allowed", "denied": "Denied", "timed_out": "Timed out: denied",
                 "cancelled": "No longer needed: the answer ended"}


@dataclass
class FollowedTurn:
    """What the follower of one turn knows of its requests (in memory; after a restart it is read again)."""

    chat_id: str
    message: MessageRecord
    files: turns.TurnFiles
    seen: int = 0  # requests 1..seen were handled
    flooded: bool = False  # more than MAX_ASKS_PER_TURN requests: the follower stops the turn
    retry_at: dict[str, float] = field(default_factory=dict)  # by key: when a failed card send/update is tried again
    sending: set[str] = field(default_factory=set)  # keys whose card is being sent or updated now
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # those sends and updates


@dataclass(frozen=True)
class Prepared:
    """A request as read, and what its card shows."""

    ask: turns.Ask
    details: tuple[tuple[str, str], ...]
    questions: tuple[Question, ...]
    unreadable: bool = False


class Approvals:
    def __init__(self, settings: Settings, store: Store, channel: Channel,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.channel = channel
        self.clock = clock
        self.mask = Masker(settings.secrets)
        self._wake: dict[str, asyncio.Event] = {}  # by chat id: a decision the chat's follower should act on
        self._tasks: set[asyncio.Task[None]] = set()
        self.closing = ""  # set at a planned shutdown: why new requests are denied at once

    def wakeup(self, chat_id: str) -> asyncio.Event:
        """Set when something was decided for the chat; its follower waits on it between polls."""
        return self._wake.setdefault(chat_id, asyncio.Event())

    # ---- the follower's side ----

    async def follow(self, turn: FollowedTurn) -> list[ApprovalRecord]:
        """One look at the turn's permission requests: new ones stored (or decided at once), decisions written for
        the host, timeouts and withdrawals applied, cards sent and updated. The requests still waiting."""
        for _ in range(ASKS_PER_LOOK):
            if turn.seen >= MAX_ASKS_PER_TURN or not turn.files.ask_made(turn.seen + 1):
                break
            turn.seen += 1
            await self._take_ask(turn, await asyncio.to_thread(self._prepare, turn.files, turn.seen))
        turn.flooded = turn.seen >= MAX_ASKS_PER_TURN and turn.files.ask_made(turn.seen + 1)
        waiting = []
        for approval in self.store.approvals(turn=turn.files.name):
            approval = self._settle(turn, approval)
            if approval.pending:
                waiting.append(approval)
            elif not approval.answered:
                await self._answer_host(turn, approval)
            self._show(turn, approval)
        return waiting

    def _prepare(self, files: turns.TurnFiles, number: int) -> Prepared:
        """On a thread: the request read with bounds, its secrets masked, and what its card shows (a request of
        megabytes, or nested hundreds deep, costs the event loop nothing)."""
        ask = files.read_ask(number)
        if ask.input is None:
            return Prepared(ask, (("Problem", ask.problem),), ())
        try:  # masked before it is cut for the card: a secret cut in two is no longer recognised
            tool_input = json.loads(self.mask(json.dumps(ask.input, ensure_ascii=False)))
        except (ValueError, RecursionError):
            return Prepared(ask, (("Problem", "the request could not be read"),), (), unreadable=True)
        details, questions = describe(ask.tool, tool_input if isinstance(tool_input, dict) else {})
        return Prepared(ask, details, questions)

    async def _take_ask(self, turn: FollowedTurn, prepared: Prepared) -> None:
        ask = prepared.ask
        if self.store.turn_approval(turn.files.name, ask.number) is not None:
            return  # stored before a restart
        log = self._log(turn.chat_id, turn.message.message_id)
        chat = resolve_chat(self.settings, turn.chat_id).options
        request = json.dumps({"details": prepared.details,
                              "questions": [dataclasses.asdict(q) for q in prepared.questions]})
        # The CLI asks one request at a time (measured): one that comes while another waits was forged by code in
        # the container, and is denied without a card.
        waiting = self.store.approvals(turn=turn.files.name, pending=True)
        approval = self.store.open_approval(secrets.token_hex(16), turn.chat_id, turn.message.message_id,
                                            turn.files.name, ask.number, ask.tool or "(unknown)", request,
                                            turn.message.sender_id, self.clock(), self.clock() + chat.approval_timeout)
        metrics.APPROVALS.labels("asked").inc()
        log.info(f"approval {approval.key[:8]}: {excerpt(approval.tool, 60)} asks "
                 f"({excerpt(_first_detail(prepared.details), 120)})")
        if ask.input is None or prepared.unreadable:
            self._decide(approval, "denied", None, ask.problem or "the request could not be read")
        elif waiting:
            self._decide(approval, "denied", None, "another request of this answer is still waiting")
        elif self.closing:
            self._decide(approval, "denied", None, self.closing)
        elif any(allowed.tool == approval.tool for allowed in self.store.always_allowed(turn.chat_id)):
            self._decide(approval, "allowed", None, "always allowed in this chat")

    def _settle(self, turn: FollowedTurn, approval: ApprovalRecord) -> ApprovalRecord:
        """A waiting request that the CLI withdrew, or whose time is up, decided so."""
        if not approval.pending:
            return approval
        if turn.files.ask_cancelled(approval.number):
            self._decide(approval, "cancelled", None, "the request was withdrawn")
        elif self.clock() >= approval.deadline:
            timeout = resolve_chat(self.settings, approval.chat_id).options.approval_timeout
            self._decide(approval, "timed_out", None, f"nobody decided within {_duration(timeout)}")
        else:
            return approval
        return self.store.approval(approval.key) or approval

    async def _answer_host(self, turn: FollowedTurn, approval: ApprovalRecord) -> None:
        if approval.state != "cancelled":
            await asyncio.to_thread(turns.write_decision, turn.files, approval.number, decision_for(approval))
        self.store.set_approval_answered(approval.key)

    def _show(self, turn: FollowedTurn, approval: ApprovalRecord) -> None:
        """The card sent while it waits, and brought to the outcome once decided (in the background: Feishu may be
        slow or limiting; the follower goes on)."""
        if approval.card is None and not approval.pending:
            return  # decided before any card was needed (always allowed, unreadable): nothing to show
        if approval.card is not None and approval.shown == approval.state:
            return
        if approval.key in turn.sending or self.clock() < turn.retry_at.get(approval.key, 0.0):
            return
        turn.sending.add(approval.key)
        task = asyncio.create_task(self._send_card(turn, approval))
        self._tasks.add(task)
        turn.tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(turn.tasks.discard)

    async def _send_card(self, turn: FollowedTurn, approval: ApprovalRecord) -> None:
        log = self._log(approval.chat_id, approval.message_id)
        try:
            if approval.card is None:
                card = await self.channel.show_approval(self.view(approval))
                self.store.set_approval_card(approval.key, card)
                log.info(f"approval {approval.key[:8]}: card {card} sent")
            else:
                await self.channel.update_approval(approval.card, self.view(approval))
                self.store.set_approval_shown(approval.key, approval.state)
        except DeliveryFailed as exc:
            turn.retry_at[approval.key] = self.clock() + (exc.retry_after or RETRY_SECONDS)
            doing = "sent" if approval.card is None else "updated"
            log.warning(f"approval {approval.key[:8]}: its card could not be {doing} ({exc}); trying again")
        finally:
            turn.sending.discard(approval.key)

    async def end_turn(self, turn: FollowedTurn) -> None:
        """The turn ended: what still waits is cancelled, and every card shows how it ended (a card still being
        sent is waited for, or it would keep its buttons)."""
        await asyncio.gather(*turn.tasks, return_exceptions=True)
        for approval in self.store.approvals(turn=turn.files.name, pending=True):
            self._decide(approval, "cancelled", None, "the answer ended")
        for approval in self.store.approvals(turn=turn.files.name):
            if approval.card is not None and approval.shown != approval.state:
                await self._send_card(turn, approval)

    # ---- decisions ----

    def _decide(self, approval: ApprovalRecord, outcome: str, by: str | None, reason: str = "",
                always: bool = False, answers: dict[str, str] | None = None) -> bool:
        decided = self.store.decide(approval.key, outcome, by, self.clock(), reason, always,
                                    json.dumps(answers, ensure_ascii=False) if answers else None)
        if decided:
            metrics.APPROVALS.labels(outcome).inc()
            metrics.APPROVAL_WAIT_SECONDS.observe(max(0.0, self.clock() - approval.asked_at))
            how = "always " if always else ""
            self._log(approval.chat_id, approval.message_id).info(
                f"approval {approval.key[:8]}: {how}{outcome}" + (f" by {by}" if by else "")
                + (f" ({excerpt(reason, 120)})" if reason else ""))
            self.wakeup(approval.chat_id).set()
        return decided

    def deny_waiting(self, reason: str) -> int:
        """A planned shutdown: every waiting request denied with `reason` (the followers tell the hosts and update
        the cards while the running turns drain), and so is every request that comes from now on; how many."""
        self.closing = reason
        return sum(self._decide(approval, "denied", None, reason)
                   for approval in self.store.approvals(pending=True))

    def cancel_orphans(self) -> None:
        """At a start: requests still waiting whose turn is not running any more (it ended while no orchestrator
        ran) are cancelled; their cards keep their buttons, which answer that the request is no longer waiting."""
        for approval in self.store.approvals(pending=True):
            message = self.store.message(approval.message_id)
            if message.state is not State.RUNNING or message.turn != approval.turn:
                self._decide(approval, "cancelled", None, "the answer ended")

    # ---- clicks ----

    async def act(self, action: CardAction) -> ActionReply:
        """A click on an approval card, answered within Feishu's 3 s: what it did, as a toast, and the card to show."""
        approval = self.store.approval(action.key)
        log = self._log(action.chat_id or "-", approval.message_id if approval else "-")
        if approval is None or approval.chat_id != action.chat_id or (
                approval.card is not None and approval.card != action.message_id):
            log.warning(f"a click on an unknown approval card ({excerpt(action.key, 40)}) by {action.operator_id}")
            return ActionReply("This card is not known to the bot.", "error")
        if not approval.pending:
            return ActionReply(f"Already settled: {self.outcome(approval)}.", "info", self.view(approval))
        if action.operator_id not in self.approvers(approval):
            log.info(f"approval {approval.key[:8]}: {action.operator_id} clicked but may not decide")
            return ActionReply("Only the person who asked and this chat's approvers can decide.", "warning")
        outcome = self._apply(approval, action)
        if isinstance(outcome, ActionReply):
            return outcome
        settled = self.store.approval(approval.key) or approval
        if outcome:
            self.store.set_approval_shown(approval.key, settled.state)  # the reply carries the updated card
            return ActionReply(f"{self.outcome(settled)}.", "success", self.view(settled))
        return ActionReply(f"Already settled: {self.outcome(settled)}.", "info", self.view(settled))

    def _apply(self, approval: ApprovalRecord, action: CardAction) -> bool | ActionReply:
        """The click's decision; False when another decision came first; an ActionReply for a click that decides
        nothing (a question partly answered, a button that does not fit the request)."""
        by = action.operator_id
        if action.choice == "deny":
            return self._decide(approval, "denied", by, action.text)
        questions = self._questions(approval)
        if action.choice == "always" and not self._may_always(approval, by):
            return ActionReply("Only this chat's listed approvers can allow a tool for good; allow it once instead.",
                               "warning")
        if action.choice in ("allow", "always") and not questions:
            return self._decide(approval, "allowed", by, always=action.choice == "always")
        if action.choice == "answer" and questions:
            answer = self._answer(questions, action)
            if answer is None:
                return ActionReply("Pick an option, or type an answer first.", "warning")
            answers = {**json.loads(approval.answers or "{}"), **answer}
            if len(answers) < len(questions):
                self.store.note_answers(approval.key, json.dumps(answers, ensure_ascii=False))
                return ActionReply(f"Noted; {len(questions) - len(answers)} more to answer.", "info")
            return self._decide(approval, "allowed", by, answers=answers)
        return ActionReply("That button does not fit this request.", "warning")

    @staticmethod
    def _answer(questions: tuple[Question, ...], action: CardAction) -> dict[str, str] | None:
        if action.question is not None and action.option is not None:
            if action.question < len(questions) and action.option < len(questions[action.question].options):
                question = questions[action.question]
                return {question.text: question.options[action.option]}
            return None
        text = action.text.strip()[:ANSWER_CHARS]
        return {questions[0].text: text} if text and len(questions) == 1 else None

    # ---- what a card shows ----

    def _may_always(self, approval: ApprovalRecord, who: str) -> bool:
        """"Always" binds everyone's later turns: only a listed approver may choose it (the sender may, where the
        chat lists nobody, as the sender is then the only approver of every turn)."""
        listed = resolve_chat(self.settings, approval.chat_id).options.approvers
        return who in listed if listed else who == approval.requested_by

    def approvers(self, approval: ApprovalRecord) -> tuple[str, ...]:
        listed = resolve_chat(self.settings, approval.chat_id).options.approvers
        return tuple(dict.fromkeys(([approval.requested_by] if approval.requested_by else []) + list(listed)))

    @staticmethod
    def _request(approval: ApprovalRecord) -> dict[str, Any]:
        return json.loads(approval.request)

    def _questions(self, approval: ApprovalRecord) -> tuple[Question, ...]:
        return tuple(Question(q["text"], q["header"], tuple(q["options"]))
                     for q in self._request(approval)["questions"])

    def view(self, approval: ApprovalRecord) -> ApprovalView:
        details = tuple((label, text) for label, text in self._request(approval)["details"])
        return ApprovalView(key=approval.key, chat_id=approval.chat_id, reply_to=approval.message_id,
                            tool=approval.tool, details=details, approvers=self.approvers(approval),
                            questions=self._questions(approval),
                            outcome=None if approval.pending else self.outcome(approval),
                            decided_by=approval.decided_by, decided_at=approval.decided_at)

    @staticmethod
    def outcome(approval: ApprovalRecord) -> str:
        """How a request ended, in a few words for people."""
        if approval.state == "allowed" and approval.answers:
            return "Answered: " + "; ".join(json.loads(approval.answers).values())
        if approval.state == "allowed" and approval.always:
            return f"Always allowed in this chat: {approval.tool}"
        if approval.state == "allowed":
            return "Allowed once" if approval.decided_by else f"Allowed: {approval.reason}"
        words = OUTCOME_WORDS.get(approval.state, approval.state)
        return f"{words}: {approval.reason}" if approval.reason and approval.state == "denied" else words

    @staticmethod
    def _log(chat_id: str, message_id: str) -> Any:
        return logger.bind(chat_id=chat_id, message_id=message_id)


def decision_for(approval: ApprovalRecord) -> bytes:
    """What the agent host tells the CLI: allow, or deny with words the model reads (and so the answer says why)."""
    if approval.state == "allowed":
        return agent_host.encode_decision(True, answers=json.loads(approval.answers) if approval.answers else None)
    if approval.state == "timed_out":
        message = f"Denied: {approval.reason} (nobody in the chat approved it)."
    elif approval.decided_by:
        message = "Denied by an approver in the chat" + (f": {approval.reason}" if approval.reason else ".")
    else:
        message = f"Denied: {approval.reason}."
    return agent_host.encode_decision(False, message)


# ---- what a request asks, for people (pure) ----------------------------------------------------------------


def describe(tool: str, tool_input: dict[str, Any]) -> tuple[tuple[tuple[str, str], ...], tuple[Question, ...]]:
    """The lines a card shows for a tool's input, bounded, and the questions of an AskUserQuestion."""
    if tool == ASK_USER:
        return (), _questions(tool_input.get("questions"))
    fields = _FIELDS.get(tool, ())
    details = [(label, _text(tool_input.get(name))) for label, name in fields if tool_input.get(name)]
    if tool in ("Edit", "MultiEdit"):
        details.append(("Diff", _diff(tool_input)))
    if not details:
        details = [("Input", _text(json.dumps(tool_input, ensure_ascii=False)))]
    return _bounded(details), ()


_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "Bash": (("Command", "command"), ("Description", "description")),
    "Write": (("File", "file_path"), ("Content", "content")),
    "Edit": (("File", "file_path"),),
    "MultiEdit": (("File", "file_path"),),
    "NotebookEdit": (("Notebook", "notebook_path"), ("Source", "new_source")),
    "WebFetch": (("URL", "url"), ("Prompt", "prompt")),
    "WebSearch": (("Query", "query"),),
}


def _text(value: Any) -> str:
    """A value for a card: invisible characters shown (a right-to-left override or a zero-width space could make a
    command read as another), and a long one cut in its middle, so its end (where `; curl …|sh` would hide) shows."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = "".join(_visible(ch) for ch in text)
    if len(text) <= DETAIL_CHARS:
        return text
    half = DETAIL_CHARS // 2
    return f"{text[:half]}\n… ({len(text) - 2 * half:,} characters not shown) …\n{text[-half:]}"


def _visible(ch: str) -> str:
    if ch in "\n\t" or (ch.isprintable() and unicodedata.category(ch) != "Cf"):
        return ch
    return f"<U+{ord(ch):04X}>"


def _diff(tool_input: dict[str, Any]) -> str:
    """The edits as removed and added lines; what is left out is said (a clean excerpt must not hide an 11th line)."""
    edits = tool_input.get("edits") if isinstance(tool_input.get("edits"), list) else [tool_input]
    lines = []
    for edit in edits[:DIFF_EDITS]:
        if isinstance(edit, dict):
            for sign, name in (("-", "old_string"), ("+", "new_string")):
                changed = str(edit.get(name, "")).splitlines()
                lines += [f"{sign} {line}" for line in changed[:DIFF_LINES]]
                if len(changed) > DIFF_LINES:
                    lines.append(f"{sign} … {len(changed) - DIFF_LINES} more line(s)")
    if len(edits) > DIFF_EDITS:
        lines.append(f"… {len(edits) - DIFF_EDITS} more edit(s)")
    return _text("\n".join(lines) or "(no change shown)")


def _bounded(details: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    kept, room = [], DETAILS_CHARS
    for label, text in details:
        if room <= 0:
            break
        kept.append((label, text[:room]))
        room -= len(text)
    return tuple(kept)


def _questions(raw: Any) -> tuple[Question, ...]:
    questions = []
    for item in raw[:MAX_QUESTIONS] if isinstance(raw, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            continue
        options = item.get("options") if isinstance(item.get("options"), list) else []
        labels = tuple(str(o.get("label"))[:OPTION_CHARS] for o in options[:MAX_OPTIONS]
                       if isinstance(o, dict) and o.get("label"))
        questions.append(Question(item["question"][:QUESTION_CHARS], str(item.get("header") or "")[:OPTION_CHARS],
                                  labels))
    return tuple(questions)


def _first_detail(details: tuple[tuple[str, str], ...]) -> str:
    return details[0][1] if details else ""


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} minutes" if seconds >= 120 else f"{seconds:g} seconds"
