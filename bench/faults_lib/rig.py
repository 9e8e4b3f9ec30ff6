"""What every fault scenario stands on: the two fakes, a config, the real orchestrator as a subprocess that
can be killed and restarted, and the bookkeeping that says whether each message was answered exactly once."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import docker

from tests.conftest import remove_instance
from tests.fakes.anthropic import FakeAnthropic, latest_user_blocks, text_of
from tests.fakes.feishu import BotMessage, FakeFeishu
from tests.harness import Orchestrator, StoreView, wait_until, write_config

Json = dict[str, Any]
T = TypeVar("T")


@dataclass
class Result:
    """One scenario's outcome: the summary line, then notes (figures) and problems (what makes it fail)."""

    name: str
    trials: int = 0
    passed: int = 0
    lost: int = 0
    duplicated: int = 0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.problems) and self.passed == self.trials

    def report(self) -> str:
        head = f"{self.name}: trials={self.trials} passed={self.passed} lost={self.lost} duplicated={self.duplicated}"
        notes = sorted(self.notes, key=lambda n: (n.startswith("data and logs kept"), n.startswith("weakness")))
        return "\n".join([head, *(f"  {n}" for n in notes), *(f"  PROBLEM: {p}" for p in self.problems)])


class TolerantFeishu(FakeFeishu):
    """The fake, able to push events of any shape (its bookkeeping of a message's chat expects a well-formed
    event and would raise before sending a malformed one), and quiet about clients killed mid-request."""

    def __init__(self) -> None:
        super().__init__()
        serve_error = self._http.handle_error

        def handle_error(request: Any, address: Any) -> None:
            if not isinstance(sys.exc_info()[1], ConnectionError):
                serve_error(request, address)

        self._http.handle_error = handle_error  # type: ignore[method-assign]

    def _learn(self, event: Json) -> None:
        with contextlib.suppress(AttributeError, KeyError, TypeError):
            super()._learn(event)


@dataclass
class Sent:
    """A user message pushed through the fake Feishu, and the text its answer must contain."""

    chat_id: str
    text: str
    expect: str
    event: Json

    @property
    def message_id(self) -> str:
        return str(self.event["event"]["message"]["message_id"])


class Rig:
    """Fakes, data dir, config and instance for one scenario; `with Rig(...)` cleans up all of it (the data
    dir is kept when the scenario found a problem, so its logs can be read)."""

    def __init__(self, name: str, result: Result, *, feishu: Json | None = None, **sections: Any) -> None:
        self.result = result
        self.root = Path(tempfile.mkdtemp(prefix=f"faults-{name}-"))
        self.instance = f"f{uuid.uuid4().hex[:8]}"
        self.api = FakeAnthropic().start()
        self.feishu = TolerantFeishu().start()
        self.docker = docker.from_env(timeout=300)
        sections.setdefault("access", {"allowed_chats": "*", "allowed_users": "*"})
        block = {"app_id": self.feishu.app_id, "app_secret": self.feishu.app_secret, "domain": self.feishu.base_url,
                 **(feishu or {})}
        self.config = write_config(self.root / "config.yaml", instance=self.instance, api_url=self.api.base_url,
                                   feishu=block, **sections)
        self.bot: Orchestrator | None = None
        self.sent: list[Sent] = []
        self.frames: dict[str, list[str]] = {}  # user message_id -> the frames that carried it

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bot is not None and self.bot.process.poll() is None:
            self.bot.kill()
        self.feishu.stop()
        self.api.stop()
        remove_instance(self.docker, self.instance)
        self.docker.close()
        if self.result.ok and not any(exc):
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            self.result.notes.append(f"data and logs kept in {self.root}")

    def containers(self) -> list[Any]:
        """Every container of this instance, running or not, by the instance label."""
        return self.docker.containers.list(all=True, filters={"label": f"orchestrator.instance={self.instance}"})

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def store(self) -> StoreView:
        return StoreView(self.data / "orchestrator.db")

    def start(self, env: dict[str, str] | None = None) -> Orchestrator:
        """Start the orchestrator (with `env` added to its environment) and wait for its long connection to the
        fake Feishu."""
        total = self.feishu.connection_count + 1
        self.bot = Orchestrator(self.config, env=env)
        self.feishu.wait_connected(timeout=120, total=total)
        return self.bot

    def kill(self) -> None:
        assert self.bot is not None
        self.bot.kill()

    def message(self, chat_id: str, text: str, expect: str | None = None, **event: Any) -> Sent:
        sent = Sent(chat_id, text, f"Fake answer to: {text}" if expect is None else expect,
                    self.feishu.text_event(chat_id, text, **event))
        self.sent.append(sent)
        return sent

    def push(self, sent: Sent) -> str:
        frame = self.feishu.push_event(sent.event)
        self.frames.setdefault(sent.message_id, []).append(frame)
        return frame

    def say(self, chat_id: str, text: str, expect: str | None = None, **event: Any) -> Sent:
        sent = self.message(chat_id, text, expect, **event)
        self.push(sent)
        return sent

    def redeliver_unacked(self) -> int:
        """What Feishu does after a reconnect: push again every message none of whose frames was acked 200."""
        acked = {ack.message_id for ack in self.feishu.acks if ack.code == 200}
        again = [s for s in self.sent if s.message_id in self.frames
                 and not acked.intersection(self.frames[s.message_id])]
        for sent in again:
            self.push(sent)
        return len(again)

    def replies(self, sent: Sent) -> list[BotMessage]:
        """The bot's replies to a message that carry its answer (not an approval card, a card written out in full:
        answers stream into CardKit cards or come as text)."""
        return [m for m in self.feishu.messages(sent.chat_id) if m.reply_to == sent.message_id
                and not (m.msg_type == "interactive" and m.card_id is None)]

    def turns(self) -> Counter[str]:
        """How many requests the fake Messages API got with each text as the newest user prompt (a turn's
        first request; a tool result continues a turn and has no text of its own)."""
        return Counter(text_of(latest_user_blocks(body)).strip() for body in list(self.api.requests))

    def answered(self, sent: Sent) -> bool:
        return any(sent.expect in m.text for m in self.replies(sent))

    def row(self, sent: Sent) -> dict[str, Any] | None:
        """The store's row of one message, if it is stored."""
        return next((m for m in self.store.messages(sent.chat_id) if m["message_id"] == sent.message_id), None)

    def states(self) -> dict[str, str]:
        """The store's state of every message of the chats written to."""
        return {m["message_id"]: m["state"] for c in {s.chat_id for s in self.sent} for m in self.store.messages(c)}

    def settle(self, timeout: float) -> bool:
        """Wait until every pushed message is delivered or failed in the store (its answer or the reason why
        not is then in the chat)."""
        return wait_for(lambda: all(self.states().get(s.message_id) in ("delivered", "failed") for s in self.sent),
                        timeout, 0.25)

    def tally(self, sent: list[Sent] | None = None) -> None:
        """Count each message as passed (one reply with its answer, one turn, delivered), lost (no answer) or
        duplicated (a second reply or a second turn); anything else is a problem."""
        result, turns = self.result, self.turns()
        states = self.states()
        typing = 0
        for s in sent if sent is not None else self.sent:
            replies, count = self.replies(s), turns[s.text.strip()]
            result.trials += 1
            typing += bool(self.feishu.reactions(s.message_id))
            if not self.answered(s):
                result.lost += 1
                result.problems.append(f"{s.message_id} ({s.text[:40]!r}): no answer; replies "
                                       f"{[m.text[:60] for m in replies]}, state {states.get(s.message_id)}")
            elif len(replies) > 1 or count > 1:
                result.duplicated += 1
                result.problems.append(f"{s.message_id} ({s.text[:40]!r}): {len(replies)} replies "
                                       f"{[m.text[:60] for m in replies]}, {count} turns")
            elif states.get(s.message_id) != "delivered" or count != 1:
                result.problems.append(f"{s.message_id}: state {states.get(s.message_id)}, {count} turns")
            else:
                result.passed += 1
        if typing:
            result.notes.append(f"weakness: {typing} answered message(s) still show the Typing reaction")


def wait_for(check: Callable[[], T], timeout: float, interval: float = 0.05) -> T:
    """`check()` once it is truthy, or its last (falsy) value after `timeout` seconds: a fault is counted,
    not raised."""
    try:
        return wait_until(check, timeout, "", interval)
    except AssertionError:
        return check()
