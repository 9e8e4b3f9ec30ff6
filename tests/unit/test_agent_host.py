"""The agent host (orchestrator/agent_host.py) in this process, on tmp folders, driving a fake stream-json CLI
(tests/fakes/stream_cli.py); requests are written by the orchestrator's own writer (turns.write_request)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator import agent_host
from orchestrator.layout import ChatPaths
from orchestrator.turns import TurnFiles, new_turn_name, write_request
from tests.harness import wait_until

FAKE_CLI = (sys.executable, str(Path(__file__).parents[1] / "fakes" / "stream_cli.py"), "-p", "--input-format",
            "stream-json", "--output-format", "stream-json", "--verbose")
TURN_SECONDS = 10.0  # a turn of the fake CLI takes well under a second; SLOW turns ask for far more than this
GOOD = {"argv": ["claude"], "env": {}, "session": None, "hot_idle": 1,
        "message": {"type": "user", "message": {"role": "user", "content": "hi"}}}


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@dataclass(frozen=True)
class Turn:
    """A turn's folder once its exit_code is written."""

    folder: Path

    def _text(self, name: str) -> str:
        return (self.folder / name).read_text()

    @property
    def exit_code(self) -> int:
        return int(self._text(agent_host.EXIT_CODE))

    @property
    def pid(self) -> int:
        return int(self._text(agent_host.PID))

    @property
    def process(self) -> str:
        return self._text(agent_host.PROCESS).strip()

    @property
    def cumulative_cost(self) -> float:
        """The CLI process's running total at this turn's result (the fake CLI's: +0.0006 a turn)."""
        return float(self.lines[-1]["total_cost_usd"])

    @property
    def stderr(self) -> str:
        return self._text(agent_host.STDERR)

    @property
    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self._text(agent_host.OUTPUT).splitlines()]

    def first(self, kind: str) -> dict[str, Any]:
        return next(line for line in self.lines if line["type"] == kind)

    @property
    def session(self) -> str:
        return self.first("system")["session_id"]

    @property
    def answer(self) -> str:
        return self.first("assistant")["message"]["content"][0]["text"]


class Channel:
    """The chat's input and turns folders, and the agent host serving them in a thread."""

    def __init__(self, root: Path) -> None:
        self.paths = ChatPaths(root=root, workspace=root / "workspace", claude_config=root / "claude",
                               turns=root / "turns", input=root / "input")
        for folder in (self.paths.workspace, self.paths.turns, self.paths.input):
            folder.mkdir(parents=True)
        self.host = agent_host.Host(str(self.paths.input), str(self.paths.turns), str(self.paths.workspace))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.error: BaseException | None = None
        self.rows = iter(range(1, 10**6))

    def _serve(self) -> None:
        try:
            self.host.serve()
        except BaseException as exc:  # the test sees it: a host that dies stops serving the chat
            self.error = exc

    def start(self) -> Channel:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.host.stop()
        (self.paths.input / "wake").touch()  # stop() does not wake the host's select(); a change in /input does
        self.thread.join(TURN_SECONDS)
        assert not self.thread.is_alive(), "the agent host did not stop"

    def write(self, data: bytes, name: str | None = None) -> str:
        name = name or new_turn_name(next(self.rows), 0)
        write_request(TurnFiles(name=name, paths=self.paths, uid=os.getuid()), data)
        return name

    def submit(self, text: str, *, argv: tuple[str, ...] = FAKE_CLI, env: dict[str, str] | None = None,
               session: str | None = None, hot_idle: float = 60.0, name: str | None = None) -> str:
        return self.write(agent_host.encode_request(list(argv), env or {}, session, text, hot_idle), name)

    def ended(self, name: str) -> Turn:
        folder = self.paths.turns / name
        wait_until(lambda: (folder / agent_host.EXIT_CODE).exists() or self.error, TURN_SECONDS, f"turn {name}")
        assert self.error is None, f"the agent host died: {self.error!r}"
        return Turn(folder)

    def ask(self, text: str, **request: Any) -> Turn:
        return self.ended(self.submit(text, **request))

    def interrupt(self, name: str) -> None:
        (self.paths.input / (name + agent_host.INTERRUPT_SUFFIX)).write_bytes(b"")

    def stop_turn(self, name: str) -> None:
        (self.paths.input / (name + agent_host.STOP_SUFFIX)).write_bytes(b"")


@pytest.fixture
def channel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Channel]:
    """Not started yet: a test may write requests first. Requests and interrupts must wake the host through
    inotify: its rescan of /input, which would hide a lost wake-up, comes later than any test waits."""
    monkeypatch.setattr(agent_host, "RESCAN_SECONDS", 60.0)
    monkeypatch.setattr(agent_host, "CGROUP", "/nonexistent")  # no usage report, unless a test makes a cgroup
    channel = Channel(tmp_path / "chat")
    yield channel
    if channel.thread.is_alive():
        channel.stop()


@pytest.fixture
def host(channel: Channel) -> Channel:
    return channel.start()


# ---- one CLI process across turns ----


def test_two_turns_are_answered_by_one_cli_process_each_with_its_own_output(host: Channel) -> None:
    first = host.ask("hello")
    second = host.ask("again", session=first.session)
    assert (first.exit_code, second.exit_code) == (0, 0)
    assert first.pid == second.pid and first.process == second.process and not gone(first.pid)
    assert (first.cumulative_cost, second.cumulative_cost) == (pytest.approx(0.0006), pytest.approx(0.0012))
    for turn, text in ((first, "hello"), (second, "again")):
        assert [line["type"] for line in turn.lines] == ["system", "assistant", "result"]
        assert turn.answer == turn.lines[-1]["result"] == f"Fake answer to: {text}"
    assert first.first("system")["cwd"] == str(host.paths.workspace)


def test_another_argv_env_or_session_starts_a_new_cli(host: Channel) -> None:
    first = host.ask("one")
    other_env = host.ask("ENV FAKE_MODE", env={"FAKE_MODE": "b"}, session=first.session)
    other_argv = host.ask("ENV FAKE_MODE", argv=(*FAKE_CLI, "--model=other"), env={"FAKE_MODE": "b"},
                          session=first.session)
    session = str(uuid.uuid4())
    other_session = host.ask("four", argv=(*FAKE_CLI, "--model=other"), env={"FAKE_MODE": "b"}, session=session)
    turns = [first, other_env, other_argv, other_session]
    assert len({turn.pid for turn in turns}) == len({turn.process for turn in turns}) == 4
    assert all(gone(turn.pid) for turn in turns[:3]), "a replaced CLI is closed"
    assert [turn.cumulative_cost for turn in turns] == [pytest.approx(0.0006)] * 4  # each a new process's first
    assert other_env.answer == other_argv.answer == "FAKE_MODE=b"
    assert other_argv.session == first.session, "the new CLI resumes the chat's session"
    assert other_session.session == session, "--resume= is passed when the request names a session"


def test_the_cli_exits_after_hot_idle_and_the_next_turn_starts_another(host: Channel) -> None:
    first = host.ask("one", hot_idle=0.5)
    wait_until(lambda: gone(first.pid), TURN_SECONDS, "the idle CLI to exit")
    second = host.ask("two", session=first.session, hot_idle=0.5)
    assert second.exit_code == 0 and second.pid != first.pid and second.cumulative_cost == pytest.approx(0.0006)
    assert second.session == first.session


# ---- interrupts, crashes, stopping ----


def test_an_interrupt_ends_a_slow_turn_with_its_result_and_the_cli_stays(host: Channel) -> None:
    name = host.submit("SLOW 60")
    wait_until(lambda: (host.paths.turns / name / agent_host.PID).exists(), TURN_SECONDS, "the turn to start")
    host.interrupt(name)
    slow = host.ended(name)  # within TURN_SECONDS, far less than the 60 s it asked for
    assert slow.exit_code == 0
    assert [line["type"] for line in slow.lines] == ["system", "control_response", "result"]
    assert slow.lines[-1]["subtype"] == "error_during_execution"
    after = host.ask("after", session=slow.session)
    assert after.exit_code == 0 and (after.pid, after.process) == (slow.pid, slow.process)


@pytest.mark.parametrize("asked", ["interrupt", "stop_turn"])
def test_an_interrupt_or_a_stop_before_the_turn_is_taken_ends_it_without_the_cli(channel: Channel, asked: str) -> None:
    name = new_turn_name(1, 0)
    getattr(channel, asked)(name)
    channel.submit("never", name=name)
    turn = channel.start().ended(name)
    assert turn.exit_code == agent_host.INTERRUPTED_BEFORE_START
    assert not (turn.folder / agent_host.PID).exists() and channel.host.cli is None


def test_a_stop_ends_the_turns_cli_with_sigterm_and_the_next_turn_gets_a_new_one(host: Channel) -> None:
    first = host.ask("one")
    name = host.submit("SLOW 60", session=first.session)
    wait_until(lambda: (host.paths.turns / name / agent_host.PID).exists(), TURN_SECONDS, "the turn to start")
    host.stop_turn(name)
    stopped = host.ended(name)  # within TURN_SECONDS, far less than the 60 s it asked for
    assert stopped.exit_code == 128 + 15 and stopped.pid == first.pid and gone(stopped.pid)
    after = host.ask("after", session=first.session)
    assert after.exit_code == 0 and after.pid != first.pid and after.session == first.session


def ended_or_zombie(pid: int) -> bool:
    """Whether the process is gone or only waits to be reaped (an orphan: reaped by whoever is pid 1 here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_a_stop_ends_the_turns_tool_processes_with_its_cli(host: Channel) -> None:
    """A turn stopped for a limit (a hung command, a flood): what its tool calls started goes with the CLI, not left
    running beside the next turn's."""
    name = host.submit("TOOL 60")
    output = host.paths.turns / name / agent_host.OUTPUT
    wait_until(lambda: output.exists() and "child " in output.read_text(), TURN_SECONDS, "the tool's process")
    child = int(output.read_text().split("child ", 1)[1].split('"', 1)[0])
    assert not ended_or_zombie(child)
    host.stop_turn(name)
    assert host.ended(name).exit_code == 128 + 15
    wait_until(lambda: ended_or_zombie(child), TURN_SECONDS, "the tool's process to end")


def test_a_stop_of_a_turn_that_ended_leaves_the_hot_cli_to_the_next_turn(host: Channel) -> None:
    """The orchestrator saw a limit passed just as the turn ended: its CLI, hot, may be taking the next turn, and a
    signal then ended that one (exit code 143). The host knows which turn is in progress: the stop changes nothing."""
    first = host.ask("one")
    host.stop_turn(first.folder.name)
    second = host.ask("two", session=first.session)
    assert second.exit_code == 0 and (second.pid, second.process) == (first.pid, first.process)
    assert not gone(first.pid)


def exited(pid: int) -> bool:
    """Whether the child has exited, leaving it for its parent to reap."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def test_a_cli_killed_mid_turn_ends_it_with_137_and_the_next_turn_resumes_in_a_new_cli(host: Channel) -> None:
    first = host.ask("one")
    crash = new_turn_name(2, 0)
    # A CLI dying closes its stdout and stderr at once: seen in one select() here (without this, about one time
    # in three), by holding the host's select() while the crashing turn's CLI dies.
    select = host.host.selector.select

    def select_once_the_cli_is_dead(timeout: float | None = None) -> Any:
        cli = host.host.cli
        if cli is not None and host.host.turn is not None and host.host.turn.name == crash:
            wait_until(lambda: exited(cli.pid), TURN_SECONDS, "the CLI to die")
        return select(timeout)

    host.host.selector.select = select_once_the_cli_is_dead  # type: ignore[method-assign]
    crashed = host.ended(host.submit("CRASH", session=first.session, name=crash))
    assert crashed.exit_code == 128 + 9 and crashed.pid == first.pid and gone(crashed.pid)
    assert [line["type"] for line in crashed.lines] == ["system"]
    after = host.ask("after", session=first.session)
    assert after.exit_code == 0 and after.pid != crashed.pid and after.cumulative_cost == pytest.approx(0.0006)
    assert after.session == first.session


def test_stopping_the_host_interrupts_the_turn_in_progress_and_closes_the_cli(host: Channel) -> None:
    name = host.submit("SLOW 60")
    wait_until(lambda: (host.paths.turns / name / agent_host.PID).exists(), TURN_SECONDS, "the turn to start")
    host.stop()
    turn = host.ended(name)
    assert turn.exit_code == 0 and turn.lines[-1]["subtype"] == "error_during_execution"
    assert gone(turn.pid)


# ---- which requests are taken ----


def test_a_turn_whose_folder_exists_is_never_run(channel: Channel) -> None:
    claimed = new_turn_name(1, 0)
    (channel.paths.turns / claimed).mkdir()  # claimed before: by an earlier host of this container
    channel.submit("no", name=claimed)
    channel.start()
    later = channel.ask("later", name=new_turn_name(2, 0))
    assert later.exit_code == 0 and later.answer == "Fake answer to: later"
    assert sorted(path.name for path in (channel.paths.turns / claimed).iterdir()) == sorted(
        [agent_host.EXIT_CODE, agent_host.OUTPUT, agent_host.STDERR])  # ended ABANDONED: no CLI, no pid
    assert (channel.paths.turns / claimed / agent_host.OUTPUT).read_bytes() == b""


def test_turns_an_earlier_host_took_and_never_ended_are_ended_abandoned_at_start(channel: Channel) -> None:
    """What the last container left: a turn it was running (its CLI went with it), one it ended, and names that are
    no turns of its: only the first is ended, so the orchestrator is told at once."""
    turns_dir = channel.paths.turns
    left, ended = new_turn_name(1, 0), new_turn_name(2, 0)
    for name in (left, ended):
        (turns_dir / name).mkdir()
        (turns_dir / name / agent_host.OUTPUT).write_bytes(b'{"type":"system"}\n')
    (turns_dir / ended / agent_host.EXIT_CODE).write_text("0\n")
    elsewhere = channel.paths.turns.parent / "elsewhere"
    elsewhere.mkdir()
    (turns_dir / new_turn_name(3, 0)).symlink_to(elsewhere)  # the agent's own link: not followed
    (turns_dir / "notes").mkdir()
    channel.start()
    turn = channel.ended(left)
    assert turn.exit_code == agent_host.ABANDONED
    assert (turns_dir / left / agent_host.STDERR).read_text() == \
        "agent-host: the container that ran this turn stopped before it ended\n"
    assert (turns_dir / left / agent_host.OUTPUT).read_bytes() == b'{"type":"system"}\n'  # kept as it was
    assert (turns_dir / ended / agent_host.EXIT_CODE).read_text() == "0\n"
    assert list(elsewhere.iterdir()) == [] and list((turns_dir / "notes").iterdir()) == []
    assert channel.ask("next").answer == "Fake answer to: next"  # and the host serves on


def test_turn_folders_the_agent_booby_trapped_neither_stop_nor_hold_the_host_at_start(channel: Channel) -> None:
    """The turn folders are the agent's to write: a FIFO where the output goes (opening it to write would wait for
    a reader for ever), a folder where the exit code is written. Each such turn is left as it is, and the host serves
    on (before, either stopped every later host of the chat at its start)."""
    turns_dir = channel.paths.turns
    fifo, blocked = new_turn_name(1, 0), new_turn_name(2, 0)
    for name in (fifo, blocked):
        (turns_dir / name).mkdir()
    os.mkfifo(turns_dir / fifo / agent_host.OUTPUT)
    (turns_dir / blocked / (agent_host.EXIT_CODE + ".tmp")).mkdir()
    channel.start()
    assert channel.ask("still here").answer == "Fake answer to: still here"
    assert not (turns_dir / fifo / agent_host.EXIT_CODE).exists()
    assert not (turns_dir / blocked / agent_host.EXIT_CODE).exists()


def test_requests_are_taken_in_row_and_attempt_order_and_other_names_are_ignored(channel: Channel) -> None:
    order = [(2, 0), (2, 1), (9, 3), (10, 0)]  # 10 sorts before 2 as text
    names = {channel.submit(f"turn {row}.{attempt}", session="s-order", name=new_turn_name(row, attempt)):
             (row, attempt) for row, attempt in reversed(order)}
    request = agent_host.encode_request(list(FAKE_CLI), {}, "s-order", "must not run", 60.0)
    for ignored in (f".{new_turn_name(1, 0)}", "notaturn", "1-0-NOTHEX0000000000", f"{new_turn_name(1, 0)}.x"):
        (channel.paths.input / ignored).write_bytes(request)
    channel.start()
    turns = {name: channel.ended(name) for name in names}
    by_cost = sorted(turns, key=lambda name: turns[name].cumulative_cost)
    assert [names[name] for name in by_cost] == order
    assert len({turn.pid for turn in turns.values()}) == 1
    assert sorted(os.listdir(channel.paths.turns)) == sorted(names)


# ---- bad requests, the CLI's stderr, long lines ----


@pytest.mark.parametrize(("request_bytes", "error"), [
    (b"{not json", "Expecting property name"),
    (json.dumps({**GOOD, "argv": "claude -p"}).encode(), "argv must be a list of strings"),
])
def test_a_malformed_request_ends_its_turn_with_2_and_the_host_goes_on(host: Channel, request_bytes: bytes,
                                                                       error: str) -> None:
    bad = host.ended(host.write(request_bytes))
    assert bad.exit_code == 2 and not (bad.folder / agent_host.PID).exists()
    assert bad.stderr.startswith("agent-host: a request it cannot read: ") and error in bad.stderr
    assert host.ask("next").exit_code == 0


def test_a_cli_that_cannot_start_ends_its_turn_and_the_host_goes_on(host: Channel) -> None:
    missing = host.ask("hi", argv=("/nonexistent/claude", "-p"))
    assert missing.exit_code != 0 and "/nonexistent/claude" in missing.stderr
    assert host.ask("next").exit_code == 0


def test_what_the_cli_writes_to_stderr_during_a_turn_lands_in_that_turns_stderr(host: Channel) -> None:
    noisy = host.ask("STDERR warning: disk is slow")
    quiet = host.ask("quiet", session=noisy.session)
    assert (noisy.exit_code, noisy.stderr) == (0, "warning: disk is slow\n")
    assert (quiet.exit_code, quiet.stderr) == (0, "")


def test_a_cli_that_cannot_resume_ends_the_turn_with_its_status_and_message(host: Channel) -> None:
    turn = host.ask("hi", session="dead-0001")
    assert turn.exit_code == 1 and turn.lines == []
    assert turn.stderr == "No conversation found with session ID: dead-0001\n"


def test_a_line_longer_than_the_parse_cap_passes_through_whole(host: Channel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_host, "MAX_PARSED_LINE", 1024)
    size = 300_000  # far more than a pipe holds (64 KiB): the host reads that line in pieces
    turn = host.ask(f"LONG {size}")
    assert turn.exit_code == 0
    assert [line["type"] for line in turn.lines] == ["system", "assistant", "assistant", "result"]
    assert turn.answer == "x" * size and turn.lines[-1]["result"] == f"Fake answer to: LONG {size}"


# ---- the request format ----


def test_decode_request_reads_what_encode_request_writes() -> None:
    request = agent_host.decode_request(agent_host.encode_request(["claude", "-p"], {"B": "2", "A": "1"}, "s1",
                                                                  "hi", 5))
    assert request.argv == ("claude", "-p") and request.env == (("A", "1"), ("B", "2"))
    assert (request.session, request.hot_idle) == ("s1", 5.0)
    assert request.message == {"type": "user", "message": {"role": "user", "content": "hi"}}


@pytest.mark.parametrize(("field", "value", "error"), [
    ("argv", [], "argv"), ("argv", "claude", "argv"), ("argv", ["claude", 1], "argv"), ("argv", None, "argv"),
    ("env", {"A": 1}, "env"), ("env", [["A", "1"]], "env"), ("env", None, "env"),
    ("session", 5, "session"), ("session", ["s"], "session"),
    ("message", "hi", "message"), ("message", {"type": "assistant"}, "message"), ("message", None, "message"),
    ("hot_idle", -1, "hot_idle"), ("hot_idle", "600", "hot_idle"), ("hot_idle", None, "hot_idle"),
])
def test_decode_request_rejects_a_bad_field(field: str, value: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        agent_host.decode_request(json.dumps({**GOOD, field: value}).encode())


def test_decode_request_rejects_what_is_not_json() -> None:
    for data in (b"{not json", b"\xff\xfe", b""):
        with pytest.raises(ValueError):
            agent_host.decode_request(data)


@pytest.mark.parametrize("data", [b"[]", b"null", b'"request"'])
def test_decode_request_rejects_json_that_is_not_an_object(data: bytes) -> None:
    with pytest.raises(ValueError):
        agent_host.decode_request(data)


def test_a_line_nested_thousands_deep_is_passed_on_not_fatal() -> None:
    """A model's tool input nested 1,500 deep came back in the CLI's output and ended the host (RecursionError)."""
    assert agent_host.peek(b'{"type":"assistant","x":' + b"[" * 5000 + b"]" * 5000 + b"}") == {}


# ---- permission requests ----


def decide(host: Channel, turn: str, decision: bytes) -> None:
    """The turn's first decision, made visible whole at once, as the orchestrator writes it (turns.write_decision)."""
    aside = host.paths.input / f".{turn}.decision"
    aside.write_bytes(decision)
    aside.rename(host.paths.input / agent_host.decision_name(turn, 1))


def test_a_permission_request_waits_for_the_orchestrators_decision(host: Channel) -> None:
    name = host.submit('ASK Bash {"command": "touch x"}')
    ask = host.paths.turns / name / agent_host.ask_name(1)
    wait_until(ask.exists, TURN_SECONDS, "the permission request")
    assert json.loads(ask.read_text()) == {"tool": "Bash", "input": {"command": "touch x"}}
    assert not (host.paths.turns / name / agent_host.EXIT_CODE).exists()  # the CLI waits
    decide(host, name, agent_host.encode_decision(True))
    assert host.ended(name).answer == 'allowed: {"command": "touch x"}'  # its own input, unchanged


def test_a_denial_reaches_the_cli_with_its_reason(host: Channel) -> None:
    name = host.submit('ASK Write {"file_path": "/w/a"}')
    wait_until((host.paths.turns / name / agent_host.ask_name(1)).exists, TURN_SECONDS, "the permission request")
    decide(host, name, agent_host.encode_decision(False, "not now"))
    assert host.ended(name).answer == "denied: not now"


def test_an_interrupt_while_a_request_waits_marks_it_cancelled(host: Channel) -> None:
    name = host.submit('ASK Bash {"command": "sleep 1"}')
    wait_until((host.paths.turns / name / agent_host.ask_name(1)).exists, TURN_SECONDS, "the permission request")
    host.interrupt(name)
    turn = host.ended(name)
    assert (turn.folder / (agent_host.ask_name(1) + agent_host.CANCELLED_SUFFIX)).exists()
    assert turn.lines[-1]["subtype"] == "error_during_execution"


# ---- files that came with the message ----


def test_the_messages_files_are_copied_into_the_workspace_before_the_cli_reads_it(host: Channel) -> None:
    name = new_turn_name(next(host.rows), 0)
    folder = host.paths.input / f"{name}.files"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"hello file")
    request = agent_host.encode_request(list(FAKE_CLI), {}, None, "ENV HOME", 60.0,
                                        files=((f"{name}.files/a.txt", "inbox/om_1/a.txt"),))
    host.write(request, name)
    host.ended(name)
    assert (host.paths.workspace / "inbox" / "om_1" / "a.txt").read_bytes() == b"hello file"


def test_a_request_whose_files_leave_their_folders_is_refused() -> None:
    for pair in (["../secret", "inbox/x"], ["a", "/etc/passwd"], ["a", "inbox/../../x"], ["a"], "a"):
        data = json.loads(agent_host.encode_request(["claude"], {}, None, "hi", 1.0))
        data["files"] = [pair]
        with pytest.raises(ValueError, match="files must be pairs"):
            agent_host.decode_request(json.dumps(data).encode())


def test_images_go_with_the_text_as_content_blocks() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    request = agent_host.decode_request(agent_host.encode_request(["claude"], {}, None, "look", 1.0, images=(image,)))
    assert request.message["message"]["content"] == [{"type": "text", "text": "look"}, image]


# ---- the pids limit's refusals during a turn ----


def test_each_turn_records_the_refusals_of_the_pids_limit_while_it_ran(channel: Channel, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Read from the cgroup's pids.events (v2's path first, here absent, then v1's), as counted at the turn's start
    and at its end: the orchestrator restarts the container when it is more than 0, with no `docker exec`."""
    events = tmp_path / "pids" / "pids.events"  # cgroup v1's place: v2's (the cgroup's own folder) is absent
    events.parent.mkdir()
    events.write_text("max 3\n")
    monkeypatch.setattr(agent_host, "CGROUP", str(tmp_path))
    host = channel.start()
    name = host.submit("SLOW 1")
    wait_until(lambda: (host.paths.turns / name / agent_host.PID).exists(), TURN_SECONDS, "the turn to start")
    events.write_text("max 5\n")  # two forks refused while it ran (before: during another turn, or between)
    assert (host.ended(name).folder / agent_host.LIMIT_HITS).read_text() == "2\n"
    files = TurnFiles(name=name, paths=host.paths, uid=os.getuid())
    assert files.hit_process_limit()
    calm = host.ask("hi")
    assert (calm.folder / agent_host.LIMIT_HITS).read_text() == "0\n"
    assert not TurnFiles(name=calm.folder.name, paths=host.paths, uid=os.getuid()).hit_process_limit()
    events.unlink()  # no pids controller: nothing is written, and nothing is taken as a refusal
    unknown = host.ask("hi again")
    assert not (unknown.folder / agent_host.LIMIT_HITS).exists() and unknown.exit_code == 0
    assert not TurnFiles(name=unknown.folder.name, paths=host.paths, uid=os.getuid()).hit_process_limit()


def test_a_fifo_where_the_count_is_written_holds_neither_the_host_nor_the_exit_code(
        channel: Channel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The turn's folder is the agent's: a FIFO where the count is written aside is refused at once (no reader
    would ever come), and the turn still ends with its exit code."""
    (tmp_path / "pids.events").write_text("max 0\n")
    monkeypatch.setattr(agent_host, "CGROUP", str(tmp_path))
    host = channel.start()
    name = host.submit("SLOW 1")
    wait_until(lambda: (host.paths.turns / name / agent_host.PID).exists(), TURN_SECONDS, "the turn to start")
    os.mkfifo(host.paths.turns / name / f"{agent_host.LIMIT_HITS}.tmp")
    ended = host.ended(name)
    assert ended.exit_code == 0 and not (ended.folder / agent_host.LIMIT_HITS).exists()
    assert host.ask("and on").exit_code == 0  # the host serves on


# ---- the container's use of its caps ----


def cgroup_tree(root: Path, version: int, cpu: int, memory: int) -> Path:
    """A cgroup's counters as the kernel shows them in a container (v2: one folder; v1: one per controller)."""
    files = ({"cpu.stat": f"usage_usec {cpu // 1000}\nuser_usec 1\n", "memory.current": f"{memory}\n",
              "memory.max": "max\n", "memory.stat": "anon 5\ninactive_file 1048576\n", "pids.current": "4\n"}
             if version == 2 else
             {"cpuacct/cpuacct.usage": f"{cpu}\n", "memory/memory.usage_in_bytes": f"{memory}\n",
              "memory/memory.limit_in_bytes": "536870912\n", "pids/pids.current": "4\n",
              "memory/memory.stat": "cache 9\ntotal_inactive_file 1048576\n"})
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("version", [2, 1])
def test_the_cgroups_counters_are_read_in_v2_and_v1(tmp_path: Path, version: int) -> None:
    root = cgroup_tree(tmp_path, version, cpu=5_000_000_000, memory=64 * 2**20)
    assert agent_host.cgroup_counters(str(root)) == {
        "cpu_ns": 5_000_000_000, "memory_bytes": 63 * 2**20,  # less the inactive file pages, as `docker stats`
        "memory_limit": 0 if version == 2 else 512 * 2**20, "pids": 4}
    assert agent_host.cgroup_counters(str(tmp_path / "none")) is None
    if version == 1:  # no memory cap: v1's largest page-aligned number, v2's "max"
        (root / "memory/memory.limit_in_bytes").write_text("9223372036854771712\n")
        assert agent_host.cgroup_counters(str(root))["memory_limit"] == 0  # type: ignore[index]
    (root / ("memory.current" if version == 2 else "memory/memory.usage_in_bytes")).write_text("lots\n")
    assert agent_host.cgroup_counters(str(root)) is None


def test_the_host_reports_its_use_at_once_and_then_every_interval(channel: Channel, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = cgroup_tree(tmp_path / "cgroup", 2, cpu=1_000_000_000, memory=32 * 2**20)
    monkeypatch.setattr(agent_host, "CGROUP", str(root))
    monkeypatch.setattr(agent_host, "USAGE_SECONDS", 0.5)
    usage = channel.paths.turns / agent_host.USAGE
    host = channel.start()
    wait_until(usage.exists, TURN_SECONDS, "the first report")
    first = json.loads(usage.read_text())
    assert first["cpu_percent"] == 0.0 and first["memory_bytes"] == 31 * 2**20 and first["pids"] == 4
    (root / "cpu.stat").write_text("usage_usec 1250000\n")  # a quarter of a CPU second more, within about 0.5 s
    wait_until(lambda: json.loads(usage.read_text())["cpu_percent"] > 0, TURN_SECONDS, "a report with CPU use")
    assert 0 < json.loads(usage.read_text())["cpu_percent"] <= 100
    assert host.ask("hi").exit_code == 0  # the report's file among the turns' folders changes nothing


def test_without_a_cgroup_nothing_is_reported_and_the_host_waits_as_before(channel: Channel, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_host, "CGROUP", str(tmp_path / "no-cgroup"))
    host = channel.start()
    assert host.ask("hi").exit_code == 0
    assert not (channel.paths.turns / agent_host.USAGE).exists()
    started = host.host.usage_at
    assert started > float("-inf")  # looked at, so the next look is USAGE_SECONDS away: the host does not spin
    time.sleep(0.3)
    assert host.host.usage_at == started
