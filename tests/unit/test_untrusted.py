"""untrusted: what root reads and writes where an agent (uid 1000) can write. Runs as root, as the service does."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import untrusted
from orchestrator.untrusted import Refused

AGENT = 1000
NOT_PLAIN_NAMES = ["", ".", "..", "a/b", "../secret", "/etc/passwd", "a\0b"]


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A folder (as the agent's turn folder) and its fd."""
    path = tmp_path / "turn"
    path.mkdir()
    os.chown(path, AGENT, AGENT)
    with untrusted.directory(path) as fd:
        yield path, fd


def agent_file(path: Path, data: bytes = b"data", owner: int = AGENT) -> Path:
    path.write_bytes(data)
    os.chown(path, owner, owner)
    return path


def outside_secret(tmp_path: Path, owner: int = AGENT) -> Path:
    """A file outside the folder: what a planted link or hard link points at."""
    return agent_file(tmp_path / "secret", b"FEISHU_APP_SECRET=s3cr3t\n", owner)


def within(seconds: float, call: Callable[[], Any], unblock: Callable[[], None]) -> Any:
    """call() in a thread; fails (after `unblock` frees the thread) if it has not returned in time."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        unblock()
        thread.join(5)
        pytest.fail(f"still blocked after {seconds} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.mark.parametrize("name", NOT_PLAIN_NAMES)
def test_names_that_are_not_one_plain_component_are_refused(folder: tuple[Path, int], name: str) -> None:
    path, fd = folder
    for call in (lambda: untrusted.open_beneath(fd, name, AGENT), lambda: untrusted.exists(fd, name),
                 lambda: untrusted.write_new(fd, name, b"x"), lambda: untrusted.make_owned_dir(fd, name, AGENT)):
        with pytest.raises(Refused):
            call()
    assert untrusted.read_small(fd, name, AGENT, 10) is None
    assert untrusted.read_tail(fd, name, AGENT, 10) == b""
    assert not (path.parent / "secret").exists()


def test_a_regular_file_of_the_owner_is_read_within_the_limit(folder: tuple[Path, int]) -> None:
    path, fd = folder
    agent_file(path / "stderr", b"0123456789")
    assert untrusted.read_small(fd, "stderr", AGENT, 4) == b"0123"
    assert untrusted.read_tail(fd, "stderr", AGENT, 4) == b"6789"
    assert untrusted.read_tail(fd, "stderr", AGENT, 100) == b"0123456789"
    assert untrusted.read_small(fd, "stderr", None, 100) == b"0123456789"


def test_an_absent_name_is_not_found(folder: tuple[Path, int]) -> None:
    _, fd = folder
    with pytest.raises(FileNotFoundError):
        untrusted.open_beneath(fd, "exit_code", AGENT)
    assert untrusted.read_small(fd, "exit_code", AGENT, 10) is None
    assert untrusted.read_tail(fd, "exit_code", AGENT, 10) == b""
    assert not untrusted.exists(fd, "exit_code")


@pytest.mark.parametrize("name", ["output.jsonl", "pid", "exit_code", "stderr"])
def test_a_symlink_to_a_file_outside_is_not_followed(tmp_path: Path, folder: tuple[Path, int], name: str) -> None:
    path, fd = folder
    (path / name).symlink_to(outside_secret(tmp_path))  # owned by the agent too: only the link is wrong
    with pytest.raises(Refused):
        untrusted.open_beneath(fd, name, AGENT)
    with pytest.raises(Refused):
        untrusted.open_beneath(fd, name, None)
    assert untrusted.read_small(fd, name, AGENT, 1000) is None
    assert untrusted.read_tail(fd, name, AGENT, 1000) == b""
    assert untrusted.exists(fd, name)  # the link itself is there


def test_a_symlink_to_a_folder_is_not_followed(tmp_path: Path, folder: tuple[Path, int]) -> None:
    path, fd = folder
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.chown(target, AGENT, AGENT)
    (path / "sub").symlink_to(target)
    with pytest.raises(Refused):
        untrusted.open_beneath(fd, "sub", AGENT, folder=True)


def test_a_fifo_is_refused_without_hanging(folder: tuple[Path, int]) -> None:
    path, fd = folder
    fifo = path / "output.jsonl"
    os.mkfifo(fifo)
    os.chown(fifo, AGENT, AGENT)

    def unblock() -> None:  # a writer lets a blocked open return
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    with pytest.raises(Refused, match="not a regular file"):
        within(5, lambda: untrusted.open_beneath(fd, "output.jsonl", AGENT), unblock)
    assert within(5, lambda: untrusted.read_small(fd, "output.jsonl", AGENT, 10), unblock) is None
    assert within(5, lambda: untrusted.read_tail(fd, "output.jsonl", AGENT, 10), unblock) == b""


def test_a_file_of_another_owner_is_refused(folder: tuple[Path, int]) -> None:
    path, fd = folder
    agent_file(path / "exit_code", b"0\n", owner=0)
    with pytest.raises(Refused, match="owned by uid 0"):
        untrusted.open_beneath(fd, "exit_code", AGENT)
    assert untrusted.read_small(fd, "exit_code", AGENT, 10) is None
    assert untrusted.read_small(fd, "exit_code", None, 10) == b"0\n"  # no owner asked: read


def test_a_hard_link_to_a_root_file_is_refused_by_its_owner(tmp_path: Path, folder: tuple[Path, int]) -> None:
    path, fd = folder
    os.link(outside_secret(tmp_path, owner=0), path / "stderr")  # same inode: no link to refuse, only the owner
    assert untrusted.read_tail(fd, "stderr", AGENT, 1000) == b""
    with pytest.raises(Refused):
        untrusted.open_beneath(fd, "stderr", AGENT)


def test_a_folder_where_a_file_must_be_and_a_file_where_a_folder_must_be(folder: tuple[Path, int]) -> None:
    path, fd = folder
    (path / "pid").mkdir()
    os.chown(path / "pid", AGENT, AGENT)
    agent_file(path / "sub")
    with pytest.raises(Refused):
        untrusted.open_beneath(fd, "pid", AGENT)
    with pytest.raises(Refused):
        untrusted.open_beneath(fd, "sub", AGENT, folder=True)
    opened = untrusted.open_beneath(fd, "pid", AGENT, folder=True)
    os.close(opened)


def test_the_folder_itself_is_not_opened_through_a_link(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OSError), untrusted.directory(tmp_path / "link"):
        pass


def test_exists_sees_a_dangling_link_without_following_it(folder: tuple[Path, int]) -> None:
    path, fd = folder
    (path / "exit_code").symlink_to("/nonexistent/target")
    assert untrusted.exists(fd, "exit_code")


def test_write_new_writes_the_whole_file_with_its_mode_whatever_the_umask(folder: tuple[Path, int]) -> None:
    path, fd = folder
    data = os.urandom(3 * 1024**2 + 7)
    previous = os.umask(0o077)
    try:
        untrusted.write_new(fd, "prompt", data)
        untrusted.write_new(fd, "private", b"x", mode=0o600)
    finally:
        os.umask(previous)
    assert (path / "prompt").read_bytes() == data
    assert stat.S_IMODE((path / "prompt").stat().st_mode) == 0o644
    assert stat.S_IMODE((path / "private").stat().st_mode) == 0o600
    assert (path / "prompt").stat().st_uid == os.geteuid()


def test_write_new_refuses_an_existing_name(folder: tuple[Path, int]) -> None:
    path, fd = folder
    agent_file(path / "prompt", b"planted")
    with pytest.raises(FileExistsError):
        untrusted.write_new(fd, "prompt", b"chat text")
    assert (path / "prompt").read_bytes() == b"planted"


@pytest.mark.parametrize("target_exists", [True, False])
def test_write_new_never_writes_through_a_planted_link(tmp_path: Path, folder: tuple[Path, int],
                                                       target_exists: bool) -> None:
    path, fd = folder
    target = tmp_path / "site-packages.pth"
    if target_exists:
        target.write_bytes(b"original")
    (path / "prompt").symlink_to(target)
    with pytest.raises(FileExistsError):
        untrusted.write_new(fd, "prompt", b"import os; os.system('pwn')")
    if target_exists:
        assert target.read_bytes() == b"original"
    else:
        assert not target.exists()


def test_make_owned_dir_makes_and_chowns_the_folder(tmp_path: Path) -> None:
    with untrusted.directory(tmp_path) as parent:
        untrusted.make_owned_dir(parent, "turns", AGENT)
        (tmp_path / "claude").mkdir()  # already there, root's: handed over
        untrusted.make_owned_dir(parent, "claude", AGENT)
        untrusted.make_owned_dir(parent, "claude", AGENT)  # again: no error
    for name in ("turns", "claude"):
        info = (tmp_path / name).stat()
        assert (info.st_uid, info.st_gid) == (AGENT, AGENT)
    assert stat.S_IMODE((tmp_path / "turns").stat().st_mode) == 0o700


def test_make_owned_dir_refuses_a_link_and_leaves_its_target_alone(tmp_path: Path) -> None:
    target = tmp_path / "etc"
    target.mkdir(mode=0o755)
    (target / "shadow").write_text("root:x")
    parent = tmp_path / "chat"
    parent.mkdir()
    (parent / "turns").symlink_to(target)
    agent_file(parent / "claude")  # a file in place of the folder
    with untrusted.directory(parent) as fd:
        with pytest.raises(Refused):
            untrusted.make_owned_dir(fd, "turns", AGENT)
        with pytest.raises(Refused):
            untrusted.make_owned_dir(fd, "claude", AGENT)
    for path in (target, target / "shadow"):
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (0, 0)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert (parent / "turns").is_symlink()


def test_excerpt_escapes_control_characters() -> None:
    assert untrusted.excerpt("a\rb\nc\x1b[31md\te") == "a\\rb\\nc\\x1b[31md\\te"
    assert untrusted.excerpt(b"ok \xff\x1b]0;title\x07") == "ok \ufffd\\x1b]0;title\\x07"
    assert untrusted.excerpt("\u202eevil") == "\\u202eevil"  # a bidi override would reorder the log line
    assert untrusted.excerpt("你好") == "你好"


def test_excerpt_is_bounded() -> None:
    assert untrusted.excerpt("x" * 10_000, 50) == "x" * 50 + "…"
    assert untrusted.excerpt("x" * 50, 50) == "x" * 50
    worst = untrusted.excerpt("\x1b" * 10_000, 50)
    assert worst.startswith("\\x1b") and len(worst) <= 50 * 4 + 1
    assert "\n" not in untrusted.excerpt("\n" * 10_000) and "\r" not in untrusted.excerpt(b"\r" * 10_000)


def test_remove_tree_unlinks_links_and_fifos_and_never_opens_them(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("host file")
    os.mkfifo(tmp_path / "fifo")
    root = tmp_path / "turns"
    tree = root / "1-1-x" / "a" / "b"
    tree.mkdir(parents=True)
    (tree / "file").write_text("x")
    (root / "1-1-x" / "to-outside").symlink_to(outside)  # a folder swapped for a link
    (root / "1-1-x" / "a" / "to-fifo").symlink_to(tmp_path / "fifo")  # a FIFO swapped in: must not hang
    os.mkfifo(root / "1-1-x" / "a" / "fifo")
    with untrusted.directory(root) as fd:
        done = threading.Event()
        worker = threading.Thread(target=lambda: (untrusted.remove_tree(fd, "1-1-x"), done.set()), daemon=True)
        worker.start()
        assert done.wait(5), "remove_tree hung"
    assert not (root / "1-1-x").exists()
    assert (outside / "keep.txt").read_text() == "host file"  # the link's target is untouched
    assert (tmp_path / "fifo").exists()


def test_remove_tree_of_a_link_or_a_file_removes_only_the_name(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "x").write_text("x")
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "plain").write_text("y")
    with untrusted.directory(tmp_path) as fd:
        untrusted.remove_tree(fd, "link")
        untrusted.remove_tree(fd, "plain")
        untrusted.remove_tree(fd, "missing")
    assert not (tmp_path / "link").is_symlink() and not (tmp_path / "plain").exists()
    assert (target / "x").exists()
