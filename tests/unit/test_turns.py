"""A turn's files: the prompt written by root, the rest written by the agent (uid 1000) and read as hostile."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from loguru import logger

from orchestrator import agent_host, layout, turns, untrusted
from orchestrator.layout import ChatPaths
from orchestrator.turns import (
    OutputReader,
    TurnFiles,
    new_turn_name,
    prune,
    request_interrupt,
    withdraw,
    write_request,
)

AGENT = 1000
MiB = 1024**2


def chat_paths(chats_dir: Path, chat_id: str = "oc_a") -> ChatPaths:
    root = chats_dir / chat_id
    paths = ChatPaths(root=root, workspace=root / "workspace", claude_config=root / "claude", turns=root / "turns",
                      input=root / "input")
    layout.prepare(paths, AGENT)
    return paths


@pytest.fixture
def paths(tmp_path: Path) -> ChatPaths:
    return chat_paths(tmp_path / "chats")


def as_agent(path: Path) -> Path:
    os.chown(path, AGENT, AGENT, follow_symlinks=False)
    return path


def agent_write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return as_agent(path)


def agent_append(path: Path, data: bytes | str) -> None:
    with path.open("ab") as file:
        file.write(data.encode() if isinstance(data, str) else data)


def make_turn(paths: ChatPaths, name: str, exit_code: str | None = None, mtime: float | None = None) -> Path:
    folder = paths.turns / name
    folder.mkdir()
    as_agent(folder)
    if exit_code is not None:
        agent_write(folder / "exit_code", exit_code)
    if mtime is not None:
        os.utime(folder, (mtime, mtime))
    return folder


def started_turn(paths: ChatPaths, name: str = "7-1-abc") -> tuple[TurnFiles, Path]:
    folder = paths.turns / name
    folder.mkdir()
    as_agent(folder)
    return TurnFiles(name, paths, AGENT), folder


def outside(tmp_path: Path, data: str = "FEISHU_APP_SECRET=s3cr3t\n") -> Path:
    """A file outside the chat's folders that a planted link points at (the agent's, so only the link is wrong)."""
    return agent_write(tmp_path / "elsewhere.txt", data)


# ---- names, prompts, folders ----------------------------------------------------------------------------


def test_turn_names_hold_a_part_that_cannot_be_guessed() -> None:
    names = {new_turn_name(12, 1) for _ in range(100)}
    assert len(names) == 100
    for name in names:
        assert name.startswith("12-1-") and len(name) >= len("12-1-") + 16 and "/" not in name


def test_prepare_gives_the_agent_its_folders_and_root_the_input(paths: ChatPaths) -> None:
    for folder in (paths.workspace, paths.claude_config, paths.turns):
        assert folder.stat().st_uid == AGENT
    assert paths.input.stat().st_uid == 0 and stat.S_IMODE(paths.input.stat().st_mode) == 0o755
    assert paths.root.stat().st_uid == 0 and stat.S_IMODE(paths.root.stat().st_mode) == 0o700
    assert [m for m in paths.mounts() if m[2]] == [(str(paths.input), "/input", True)]


def test_the_request_is_written_in_roots_input_folder_whole_and_withdrawn(paths: ChatPaths) -> None:
    files = TurnFiles(new_turn_name(3, 1), paths, AGENT)
    write_request(files, b'{"text": "h\xc3\xa9llo"}')
    request = paths.input / files.name
    assert request.read_bytes() == b'{"text": "h\xc3\xa9llo"}' and files.requested()
    assert request.stat().st_uid == 0 and stat.S_IMODE(request.stat().st_mode) == 0o644
    assert [p.name for p in paths.input.iterdir()] == [files.name]  # the temporary name is gone
    with pytest.raises(FileExistsError):
        write_request(files, b"again")
    request_interrupt(files)
    request_interrupt(files)  # twice is once
    assert (paths.input / f"{files.name}.interrupt").exists()
    withdraw(files)
    withdraw(files)  # nothing left to withdraw is fine
    assert not files.requested() and list(paths.input.iterdir()) == []


def test_a_decision_is_published_once_even_after_a_kill_left_its_temporary_file(paths: ChatPaths) -> None:
    files = TurnFiles(new_turn_name(4, 1), paths, AGENT)
    name = agent_host.decision_name(files.name, 1)
    (paths.input / f".{name}").write_bytes(b"half")  # a process killed between its write and its link
    turns.write_decision(files, 1, b'{"behavior": "allow"}')
    assert (paths.input / name).read_bytes() == b'{"behavior": "allow"}'
    assert stat.S_IMODE((paths.input / name).stat().st_mode) == 0o644
    turns.write_decision(files, 1, b'{"behavior": "deny"}')  # written once: a second decision changes nothing
    assert (paths.input / name).read_bytes() == b'{"behavior": "allow"}'
    (paths.input / f".{name}").write_bytes(b"left over")
    withdraw(files)
    assert list(paths.input.iterdir()) == []


def test_a_request_is_never_written_through_a_link(tmp_path: Path, paths: ChatPaths) -> None:
    files = TurnFiles(new_turn_name(3, 1), paths, AGENT)
    target = tmp_path / "evil.pth"
    (paths.input / f".{files.name}").symlink_to(target)
    write_request(files, b"import os")  # the link is removed, never followed
    assert not target.exists() and (paths.input / files.name).read_bytes() == b"import os"
    (paths.input / files.name).unlink()
    (paths.input / files.name).symlink_to(target)
    with pytest.raises(FileExistsError):  # and a name that exists is never replaced
        write_request(files, b"import os")
    assert not target.exists()


def test_exit_code_and_pid_only_when_complete(paths: ChatPaths) -> None:
    files = TurnFiles("7-1-abc", paths, AGENT)
    assert not files.started()
    assert files.exit_code() is None and files.pid() is None and files.stderr() == ""
    assert files.open_output() is None
    _, folder = started_turn(paths)
    assert files.started()
    agent_write(folder / "exit_code", "")
    assert files.exit_code() is None
    agent_write(folder / "exit_code", "13")
    agent_write(folder / "exit_code", "137\n")
    agent_write(folder / "pid", "42\n")
    agent_write(folder / "stderr", "x" * 10_000 + "last words")
    assert files.exit_code() == 137 and files.pid() == 42
    assert files.stderr().endswith("last words") and len(files.stderr()) == turns.STDERR_TAIL
    agent_write(folder / "pid", "not a number")
    assert files.pid() is None


@pytest.mark.parametrize("name", ["output.jsonl", "pid", "exit_code", "stderr"])
def test_a_symlinked_turn_file_is_not_read(tmp_path: Path, paths: ChatPaths, name: str) -> None:
    files, folder = started_turn(paths)
    (folder / name).symlink_to(outside(tmp_path, "12\n"))
    as_agent(folder / name)
    assert files.exit_code() is None and files.pid() is None and files.stderr() == ""
    assert files.open_output() is None
    reader = OutputReader(files, MiB, 64 * MiB)
    assert reader.new_lines() == [] and reader.rest() == []


def test_a_symlinked_turn_folder_is_absent(tmp_path: Path, paths: ChatPaths) -> None:
    elsewhere = tmp_path / "other-chat-turn"
    elsewhere.mkdir()
    as_agent(elsewhere)
    for name, data in (("exit_code", "0\n"), ("pid", "1\n"), ("stderr", "secret"), ("output.jsonl", '{"a":1}\n')):
        agent_write(elsewhere / name, data)
    (paths.turns / "7-1-abc").symlink_to(elsewhere)
    as_agent(paths.turns / "7-1-abc")
    files = TurnFiles("7-1-abc", paths, AGENT)
    assert not files.started()
    assert files.exit_code() is None and files.pid() is None and files.stderr() == ""
    assert files.open_output() is None
    assert OutputReader(files, MiB, 64 * MiB).rest() == []


def test_files_and_folders_not_owned_by_the_agent_are_refused(tmp_path: Path, paths: ChatPaths) -> None:
    files, folder = started_turn(paths)
    (folder / "exit_code").write_text("0\n")  # root's
    os.link(outside(tmp_path), folder / "stderr")  # a hard link to the agent's file is the agent's
    root_file = tmp_path / "root-secret"
    root_file.write_text("s3cr3t")
    os.link(root_file, folder / "output.jsonl")  # a hard link to a root file: refused by its owner
    assert files.exit_code() is None
    assert "FEISHU_APP_SECRET" in files.stderr()
    assert files.open_output() is None
    os.chown(folder, 0, 0)
    agent_write(folder / "pid", "5\n")
    assert not files.started() and files.pid() is None


def test_a_fifo_as_output_is_refused_without_hanging(paths: ChatPaths) -> None:
    files, folder = started_turn(paths)
    for name in ("output.jsonl", "exit_code", "stderr"):
        os.mkfifo(folder / name)
        as_agent(folder / name)
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.extend(
        [files.open_output(), files.exit_code(), files.stderr(), OutputReader(files, MiB, MiB).new_lines()]),
        daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():
        for name in ("output.jsonl", "exit_code", "stderr"):  # free the thread: a writer lets the open return
            os.close(os.open(folder / name, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO blocked")
    assert results == [None, None, "", []]


# ---- reading the output ---------------------------------------------------------------------------------


def output(paths: ChatPaths, line_bytes: int = MiB, output_bytes: int = 64 * MiB) -> tuple[OutputReader, Path]:
    files, folder = started_turn(paths)
    return OutputReader(files, line_bytes, output_bytes), folder / "output.jsonl"


def test_reader_returns_only_complete_new_lines(paths: ChatPaths) -> None:
    reader, path = output(paths)
    assert reader.new_lines() == []  # not written yet
    agent_write(path, b'{"a":1}\n{"b":')
    assert reader.new_lines() == ['{"a":1}']
    agent_append(path, b'2}\n{"c":3}\n')
    assert reader.new_lines() == ['{"b":2}', '{"c":3}']
    assert reader.new_lines() == []
    agent_append(path, b"tail without newline")
    assert reader.rest() == ["tail without newline"]
    assert reader.rest() == []
    reader.close()


def test_reader_handles_multibyte_text_split_across_reads(paths: ChatPaths) -> None:
    reader, path = output(paths)
    data = "你好，世界\n".encode()
    agent_write(path, data[:4])
    assert reader.new_lines() == []
    agent_append(path, data[4:])
    assert reader.new_lines() == ["你好，世界"]


def test_a_line_over_the_cap_is_skipped_and_counted_and_the_next_lines_arrive(paths: ChatPaths) -> None:
    reader, path = output(paths, line_bytes=10)
    agent_write(path, b"short\n" + b"x" * 50 + b"\nexactly10!\nafter\n")
    assert reader.new_lines() == ["short", "exactly10!", "after"]
    assert reader.skipped_lines == 1
    agent_append(path, b"y" * 30)  # over the cap before its newline: dropped as it comes
    assert reader.new_lines() == []
    assert reader.skipped_lines == 2
    agent_append(path, b"y" * 30)
    assert reader.new_lines() == []
    agent_append(path, b"yy\nnext\n")
    assert reader.new_lines() == ["next"]
    assert reader.skipped_lines == 2


def test_the_output_cap_stops_reading(paths: ChatPaths) -> None:
    reader, path = output(paths, line_bytes=100, output_bytes=20)
    agent_write(path, b"0123456789\n" * 10)
    assert reader.new_lines() == ["0123456789"]  # the second line is cut by the cap: not complete
    assert reader.over_limit and reader.offset == 20
    agent_append(path, b"more\n")
    assert reader.new_lines() == [] and reader.offset == 20
    assert reader.rest() == ["012345678"]


def test_memory_stays_bounded_for_a_line_without_end(monkeypatch: pytest.MonkeyPatch, paths: ChatPaths) -> None:
    monkeypatch.setattr(turns, "READ_CHUNK", MiB // 2)
    reader, path = output(paths, line_bytes=MiB)
    agent_write(path, b"")
    with path.open("ab") as file:
        for _ in range(10):
            file.write(b"z" * MiB)
            file.flush()
            assert reader.new_lines() == []
            assert len(reader._partial) <= MiB
    while reader.offset < 10 * MiB:
        assert reader.new_lines() == []
        assert len(reader._partial) <= MiB
    agent_append(path, b"\n{\"ok\":1}\n")
    assert reader.new_lines() + reader.new_lines() == ['{"ok":1}']
    assert reader.skipped_lines == 1


def test_rest_reads_to_the_end_past_chunks_without_a_complete_line(monkeypatch: pytest.MonkeyPatch,
                                                                    paths: ChatPaths) -> None:
    monkeypatch.setattr(turns, "READ_CHUNK", 16)
    reader, path = output(paths, line_bytes=8)
    agent_write(path, b"x" * 100 + b'\n{"ok":1}\n' + b"y" * 40 + b'\nlast')
    assert reader.rest() == ['{"ok":1}', "last"]
    assert reader.skipped_lines == 2
    long_reader, long_path = output(chat_paths(paths.root.parent, "oc_b"), line_bytes=64)
    agent_write(long_path, b"a" * 60 + b"\n" + "é".encode() * 30)  # lines longer than a chunk, within the cap
    assert long_reader.rest() == ["a" * 60, "é" * 30]


def test_the_output_file_swapped_after_opening_is_not_followed(tmp_path: Path, paths: ChatPaths) -> None:
    reader, path = output(paths)
    agent_write(path, b"one\n")
    assert reader.new_lines() == ["one"]
    path.unlink()
    path.symlink_to(outside(tmp_path, "stolen\n" * 10))
    assert reader.new_lines() == []  # still the file it opened


# ---- pruning ----------------------------------------------------------------------------------------------


def prompt(paths: ChatPaths, name: str, age: float) -> Path:
    path = paths.input / name
    path.write_text("text")
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_prune_keeps_the_newest_finished_turns_and_never_a_busy_one(paths: ChatPaths) -> None:
    old = turns.ORPHAN_REQUEST_SECONDS + 60
    for n in range(6):
        make_turn(paths, f"{n}-1-r", exit_code=None if n == 0 else "0", mtime=1000 + n)
        prompt(paths, f"{n}-1-r", old)
    make_turn(paths, "9-1-r")  # running: no exit code yet
    make_turn(paths, "8-1-r", exit_code="0", mtime=1)  # finished but still busy (being read)
    prompt(paths, "10-1-r", old)  # a turn that is busy and has not made its folder yet
    prompt(paths, "11-1-r", 60)  # an orphan, but young
    prompt(paths, "12-1-r", old)  # an old orphan
    other = chat_paths(paths.root.parent, "oc_b")
    for n in range(3):
        make_turn(other, f"{n}-1-r", exit_code="0", mtime=1000 + n)
    assert prune(paths.root.parent, keep=2, busy={"8-1-r", "10-1-r", None}) == 4
    assert names(paths.turns) == ["0-1-r", "4-1-r", "5-1-r", "8-1-r", "9-1-r"]
    assert names(paths.input) == ["0-1-r", "10-1-r", "11-1-r", "4-1-r", "5-1-r"]
    assert names(other.turns) == ["1-1-r", "2-1-r"]


def test_prune_with_nothing_to_do(tmp_path: Path, paths: ChatPaths) -> None:
    assert prune(tmp_path / "absent", keep=2, busy=set()) == 0
    (paths.root.parent / "stray-file").write_text("x")
    chat_dir_without_turns = paths.root.parent / "oc_c"
    chat_dir_without_turns.mkdir()
    assert prune(paths.root.parent, keep=2, busy=set()) == 0


def test_prune_does_not_follow_a_planted_link(tmp_path: Path, paths: ChatPaths) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "exit_code").write_text("0")
    (victim / "precious").write_text("keep me")
    (paths.turns / "1-1-r").symlink_to(victim)  # a "finished turn" that is a link
    folder = make_turn(paths, "2-1-r", exit_code="0", mtime=1)
    (folder / "inner").symlink_to(victim)  # a link inside a turn that is pruned
    make_turn(paths, "3-1-r", exit_code="0", mtime=2)
    agent_write(paths.turns / "4-1-r", "a file, not a folder")
    assert prune(paths.root.parent, keep=0, busy=set()) == 2
    assert names(victim) == ["exit_code", "precious"] and (victim / "precious").read_text() == "keep me"
    assert names(paths.turns) == ["1-1-r", "4-1-r"]


def test_prune_survives_turns_vanishing_meanwhile(monkeypatch: pytest.MonkeyPatch, paths: ChatPaths) -> None:
    for n in range(4):
        make_turn(paths, f"{n}-1-r", exit_code="0", mtime=1000 + n)
    real_open, real_exists = untrusted.open_beneath, untrusted.exists

    def vanishing_open(dir_fd: int, name: str, owner: int | None, folder: bool = False) -> int:
        if name == "0-1-r":  # gone between the listing and the open
            _remove(paths.turns / name)
        return real_open(dir_fd, name, owner, folder)

    def vanishing_exists(dir_fd: int, name: str) -> bool:
        if os.path.exists(paths.turns / "1-1-r" / "exit_code"):
            _remove(paths.turns / "1-1-r")  # gone between the open and the look inside
        return real_exists(dir_fd, name)

    monkeypatch.setattr(untrusted, "open_beneath", vanishing_open)
    monkeypatch.setattr(untrusted, "exists", vanishing_exists)
    prune(paths.root.parent, keep=1, busy=set())
    assert names(paths.turns) == ["3-1-r"]


def _remove(folder: Path) -> None:
    if folder.exists():
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()


@pytest.mark.parametrize("forged", ["-1", "0", "1", "99999999999", "4194304"])
def test_a_pid_that_would_signal_the_whole_container_or_its_init_is_refused(paths: ChatPaths, forged: str) -> None:
    files, folder = started_turn(paths)
    agent_write(folder / "pid", forged)  # it becomes `kill -INT <pid>` in the container
    assert files.pid() is None
    agent_write(folder / "pid", "42")
    assert files.pid() == 42


def test_forged_tiny_lines_stop_at_the_line_cap(paths: ChatPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turns, "MAX_LINES", 1000)
    files, folder = started_turn(paths)
    agent_write(folder / "output.jsonl", b"{}\n" * 5000)
    reader = OutputReader(files, MiB, 64 * MiB)
    taken = reader.new_lines()
    assert len(taken) == 5000 and reader.too_many_lines and reader.over_limit  # one chunk, then no more
    assert reader.new_lines() == []


def test_a_messages_files_are_readable_by_the_agent_host_whatever_the_umask(paths: ChatPaths) -> None:
    files = TurnFiles(new_turn_name(5, 1), paths, AGENT)
    old = os.umask(0o077)  # the service's systemd unit
    try:
        turns.write_inbound(files, {"a.png": b"png"})
    finally:
        os.umask(old)
    folder = paths.input / turns.files_folder(files.name)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755 and stat.S_IMODE((folder / "a.png").stat().st_mode) == 0o644
    withdraw(files)
    assert not folder.exists()


def test_a_messages_files_half_written_are_removed_and_old_ones_pruned(tmp_path: Path, paths: ChatPaths) -> None:
    files = TurnFiles(new_turn_name(6, 1), paths, AGENT)
    with pytest.raises(untrusted.Refused):  # a name write_new refuses, as a full disk would fail a write
        turns.write_inbound(files, {"a.png": b"png", "../b": b"x"})
    assert not (paths.input / turns.files_folder(files.name)).exists()
    turns.write_inbound(files, {"a.png": b"png"})
    folder = paths.input / turns.files_folder(files.name)
    os.utime(folder, (0, 0))  # its turn never withdrew it (a crash between the files and the request)
    turns.prune(paths.root.parent, keep=10, busy=set())
    assert not folder.exists()


# ---- what the mutation run found untested (issue 15) -------------------------------------------------------


def test_files_not_owned_by_the_agent_are_refused_through_turn_files(paths: ChatPaths) -> None:
    files = turns.turn_files(paths, new_turn_name(7, 1), AGENT)
    folder = make_turn(paths, files.name)
    for name, data in (("exit_code", "0\n"), ("pid", "42\n"), ("stderr", "root's secret"),
                       ("ask-1", '{"tool": "Bash", "input": {}}')):
        (folder / name).write_text(data)  # root's: not what the agent wrote
    assert files.exit_code() is None and files.pid() is None and files.stderr() == ""
    assert files.read_ask(1) == turns.Ask(1, "", None, "the request could not be read")


def test_a_turn_not_started_reads_nothing_from_the_working_folder(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path, paths: ChatPaths) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for name, data in (("exit_code", "0\n"), ("pid", "42\n"), ("stderr", "secret"),
                       ("ask-1", '{"tool": "Bash", "input": {}}')):
        agent_write(cwd / name, data)
    monkeypatch.chdir(cwd)  # a file relative to no folder would be read from here
    files = TurnFiles(new_turn_name(7, 1), paths, AGENT)
    assert files.exit_code() is None and files.pid() is None and files.stderr() == ""
    assert files.read_ask(1).input is None


def test_the_lowest_and_highest_plain_pids_are_taken(paths: ChatPaths) -> None:
    files, folder = started_turn(paths)
    for pid in (2, 2**22 - 1):
        agent_write(folder / "pid", str(pid))
        assert files.pid() == pid


def test_has_output_only_once_a_byte_is_written(paths: ChatPaths) -> None:
    files, folder = started_turn(paths)
    assert not files.has_output()  # no file at all
    agent_write(folder / "output.jsonl", b"")
    assert not files.has_output()
    agent_write(folder / "output.jsonl", b"{")
    assert files.has_output()


def test_a_refused_output_is_logged_once_per_turn_with_its_reason(tmp_path: Path, paths: ChatPaths) -> None:
    files, folder = started_turn(paths, new_turn_name(8, 1))
    (folder / "output.jsonl").symlink_to(outside(tmp_path))
    as_agent(folder / "output.jsonl")
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="WARNING", format="{message}")
    try:
        assert [files.open_output() for _ in range(3)] == [None, None, None]
    finally:
        logger.remove(sink)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"turn {files.name}: its output is refused (output.jsonl: ")
    assert "symbolic links" in lines[0]


def test_undecodable_bytes_are_replaced_not_raised(paths: ChatPaths) -> None:
    reader, path = output(paths)
    agent_write(path, b'{"a":"\xff"}\n\xfe')
    assert reader.new_lines() == ['{"a":"\ufffd"}']
    assert reader.rest() == ["\ufffd"]
    agent_write(path.parent / "stderr", b"died \xff")
    assert reader.files.stderr() == "died \ufffd"


def test_a_partial_line_of_exactly_the_cap_is_kept(paths: ChatPaths) -> None:
    reader, path = output(paths, line_bytes=10)
    agent_write(path, b"exactly10!")
    assert reader.new_lines() == [] and reader.skipped_lines == 0
    agent_append(path, b"\n")
    assert reader.new_lines() == ["exactly10!"] and reader.skipped_lines == 0


def test_the_line_cap_counts_lines_across_reads(paths: ChatPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turns, "MAX_LINES", 4)
    reader, path = output(paths)
    agent_write(path, b"a\nb\n")
    assert reader.new_lines() == ["a", "b"] and not reader.too_many_lines
    agent_append(path, b"c\n")
    assert reader.new_lines() == ["c"] and not reader.too_many_lines
    agent_append(path, b"d\n")
    assert reader.new_lines() == ["d"] and reader.too_many_lines  # the fourth line reaches the cap
    agent_append(path, b"e\n")
    assert reader.new_lines() == [] and reader.rest() == []


def test_a_reader_closed_twice_or_never_opened_and_read_again(paths: ChatPaths) -> None:
    reader, path = output(paths)
    reader.close()  # never opened
    agent_write(path, b"one\n")
    assert reader.new_lines() == ["one"]
    reader.close()
    reader.close()
    agent_append(path, b"two\n")
    assert reader.new_lines() == ["two"]  # opened again, where it stopped
    reader.close()


def ask_file(paths: ChatPaths, number: int, data: bytes | str) -> TurnFiles:
    folder = paths.turns / "7-1-abc"
    if not folder.exists():
        started_turn(paths)
    agent_write(folder / agent_host.ask_name(number), data)
    return TurnFiles("7-1-abc", paths, AGENT)


def test_a_permission_request_is_read(paths: ChatPaths) -> None:
    assert TurnFiles("7-1-abc", paths, AGENT).read_ask(1) == turns.Ask(1, "", None, "the request could not be read")
    files = ask_file(paths, 1, json.dumps({"tool": "Bash", "input": {"command": "ls"}}))
    assert files.read_ask(1) == turns.Ask(1, "Bash", {"command": "ls"}, "")
    assert files.read_ask(2) == turns.Ask(2, "", None, "the request could not be read")
    ask_file(paths, 3, json.dumps({"tool": "T" * 150, "input": {}}))
    assert files.read_ask(3).tool == "T" * 100


@pytest.mark.parametrize("data", ["not json", '{"tool": 1, "input": {}}', '{"tool": "Bash", "input": []}',
                                  '{"tool": "Bash"}', '""', "[" * 100_000])
def test_a_permission_request_not_in_the_hosts_format(paths: ChatPaths, data: str) -> None:
    files = ask_file(paths, 4, data)
    assert files.read_ask(4) == turns.Ask(4, "", None, "the request is not in the host's format")


def test_a_permission_request_of_exactly_the_cap_is_read_and_one_over_it_is_not(paths: ChatPaths) -> None:
    head, tail = '{"tool": "Write", "input": {"content": "', '"}}'
    content = "x" * (turns.MAX_ASK_BYTES - len(head) - len(tail))
    files = ask_file(paths, 1, head + content + tail)
    assert files.read_ask(1) == turns.Ask(1, "Write", {"content": content}, "")
    ask_file(paths, 2, head + content + "x" + tail)
    assert files.read_ask(2) == turns.Ask(2, "Write", None, "its input is over 2,097,152 bytes")
    ask_file(paths, 3, "x" * (turns.MAX_ASK_BYTES + 1))  # not even the host's head: no tool to name
    assert files.read_ask(3) == turns.Ask(3, "", None, "its input is over 2,097,152 bytes")


def test_the_interrupt_request_is_an_empty_file(paths: ChatPaths) -> None:
    files = TurnFiles(new_turn_name(3, 1), paths, AGENT)
    request_interrupt(files)
    assert (paths.input / f"{files.name}.interrupt").read_bytes() == b""


def test_a_messages_files_left_by_an_earlier_try_are_replaced(paths: ChatPaths) -> None:
    files = TurnFiles(new_turn_name(6, 1), paths, AGENT)
    turns.write_inbound(files, {"old.png": b"old"})
    turns.write_inbound(files, {"new.png": b"new"})  # the first try failed before its request
    folder = paths.input / turns.files_folder(files.name)
    assert names(folder) == ["new.png"] and (folder / "new.png").read_bytes() == b"new"


def test_prune_does_not_follow_a_chat_folder_that_is_a_link(tmp_path: Path, paths: ChatPaths) -> None:
    elsewhere = chat_paths(tmp_path / "elsewhere")
    make_turn(elsewhere, "1-1-r", exit_code="0")
    (paths.root.parent / "oc_link").symlink_to(elsewhere.root)
    assert prune(paths.root.parent, keep=0, busy=set()) == 0
    assert names(elsewhere.turns) == ["1-1-r"]


def test_prune_a_chat_without_an_input_folder(paths: ChatPaths) -> None:
    bare = paths.root.parent / "oc_bare"
    (bare / "turns").mkdir(parents=True)
    (bare / "turns" / "1-1-r").mkdir()
    (bare / "turns" / "1-1-r" / "exit_code").write_text("0")
    assert prune(paths.root.parent, keep=0, busy=set()) == 1
    assert names(bare / "turns") == []


def test_an_orphan_request_is_pruned_only_once_older_than_the_limit(monkeypatch: pytest.MonkeyPatch,
                                                                    paths: ChatPaths) -> None:
    now = 2_000_000_000
    monkeypatch.setattr(turns, "time", SimpleNamespace(time=lambda: float(now)))
    limit = int(turns.ORPHAN_REQUEST_SECONDS)
    for name, age in (("1-1-r", limit), ("2-1-r", limit + 1)):
        os.utime(prompt(paths, name, 0), (now - age, now - age))
    prune(paths.root.parent, keep=10, busy=set())
    assert names(paths.input) == ["1-1-r"]


def test_prune_keeps_the_files_of_a_busy_turn_and_leaves_links(tmp_path: Path, paths: ChatPaths) -> None:
    old = time.time() - turns.ORPHAN_REQUEST_SECONDS - 60
    for name in ("10-1-r.files", "12-1-r.files"):
        (paths.input / name).mkdir()
        (paths.input / name / "a.png").write_bytes(b"png")
        os.utime(paths.input / name, (old, old))
    target = tmp_path / "target"
    target.write_text("x")
    os.utime(target, (old, old))
    (paths.input / "13-1-r").symlink_to(target)
    os.utime(paths.input / "13-1-r", (old, old), follow_symlinks=False)
    prune(paths.root.parent, keep=10, busy={"10-1-r"})  # 10 waits for its container: its files stay
    assert names(paths.input) == ["10-1-r.files", "13-1-r"] and target.exists()
