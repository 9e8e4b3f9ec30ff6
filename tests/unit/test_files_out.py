"""Files out: what the agent leaves in its outbox is taken as hostile input, copied into root's folder once per turn,
and the answer says what was refused (real folders, links, FIFOs; the agent's uid is this test's own)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from orchestrator import files_out
from orchestrator.config import FileSettings
from orchestrator.layout import ChatPaths

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100
UID = os.getuid()
SECRET = "sk-secret-123"


@pytest.fixture
def chat(tmp_path: Path) -> tuple[Path, Path]:
    """(the chat's root folder, its workspace with an outbox)."""
    root = tmp_path / "chat"
    workspace = root / "workspace"
    (workspace / "outbox").mkdir(parents=True)
    return root, workspace


def take(chat: tuple[Path, Path], answer: str = "the answer", turn: str = "1-1-abc",
         limits: FileSettings | None = None) -> files_out.Sending:
    paths = ChatPaths(chat[0], chat[1], chat[0] / "claude", chat[0] / "turns", chat[0] / "input")
    return files_out.take(paths, UID, turn, answer, limits or FileSettings(), 0, lambda text: text.replace(SECRET, "*"))


def test_an_image_and_a_file_with_a_caption_are_copied_and_leave_the_outbox(chat: tuple[Path, Path]) -> None:
    outbox = chat[1] / "outbox"
    (outbox / "chart.png").write_bytes(PNG)
    (outbox / "report.csv").write_text("a,b\n1,2\n")
    (outbox / "report.csv.caption").write_text("  the numbers  ")
    sending = take(chat)
    assert sending.text == "the answer"
    [(chart, no_caption), (report, caption)] = sending.files
    assert (chart.kind, chart.name, chart.size, no_caption) == ("image", "chart.png", len(PNG), "")
    assert (report.kind, report.name, caption) == ("file", "report.csv", "the numbers")
    assert Path(chart.path).read_bytes() == PNG and Path(report.path).read_text() == "a,b\n1,2\n"
    assert Path(chart.path).is_relative_to(chat[0] / files_out.SENDING)  # root's copy, not the workspace's file
    assert list(outbox.iterdir()) == []


def test_the_kind_is_told_by_the_bytes_not_the_name(chat: tuple[Path, Path]) -> None:
    outbox = chat[1] / "outbox"
    (outbox / "fake.png").write_text("not an image")
    (outbox / "picture.dat").write_bytes(PNG)
    kinds = {file.name: file.kind for file, _ in take(chat).files}
    assert kinds == {"fake.png": "file", "picture.dat": "image"}


def test_a_link_to_a_host_file_sends_nothing_and_says_so(chat: tuple[Path, Path], tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text("root's secret")
    outbox = chat[1] / "outbox"
    (outbox / "passwd").symlink_to(secret)
    sending = take(chat)
    assert sending.files == ()
    assert "outbox/passwd was not sent: it is a link, and links are not followed." in sending.text
    assert str(secret) not in sending.text and "root's secret" not in sending.text
    assert not (outbox / "passwd").is_symlink()  # the link is gone, what it pointed to is untouched
    assert secret.read_text() == "root's secret"
    assert not any("root's secret" in p.read_text(errors="replace")
                   for p in (chat[0] / files_out.SENDING).rglob("*") if p.is_file())


def test_folders_fifos_empty_files_and_files_over_the_limit_are_refused(chat: tuple[Path, Path]) -> None:
    outbox = chat[1] / "outbox"
    (outbox / "folder").mkdir()
    os.mkfifo(outbox / "pipe")  # opening it to read would hang without O_NONBLOCK
    (outbox / "empty.txt").touch()
    (outbox / "big.bin").write_bytes(b"x" * 2048)
    (outbox / "ok.txt").write_text("ok")
    result: list[files_out.Sending] = []
    worker = threading.Thread(target=lambda: result.append(take(chat, limits=FileSettings(max_bytes=1024))),
                              daemon=True)
    worker.start()
    worker.join(10)
    assert result, "taking the outbox hung on a FIFO"
    [sending] = result
    assert [file.name for file, _ in sending.files] == ["ok.txt"]
    assert "outbox/folder was not sent: it is a folder" in sending.text
    assert "outbox/pipe was not sent: it is not a regular file." in sending.text
    assert "outbox/empty.txt was not sent: it is empty." in sending.text
    assert "outbox/big.bin was not sent: it is over the limit of 1.0 KiB for a file." in sending.text
    assert sorted(p.name for p in outbox.iterdir()) == ["folder"]  # a folder stays; the rest were dealt with


def test_a_file_of_another_owner_is_not_sent(chat: tuple[Path, Path]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file away")
    other = chat[1] / "outbox" / "hardlinked"
    other.write_text("someone else's")
    os.chown(other, 4321, 4321)  # as a hard link to a root file would be: not the agent's
    sending = take(chat)
    assert sending.files == () and "outbox/hardlinked was not sent: it is not the agent's own file." in sending.text


def test_an_outbox_that_is_a_link_sends_nothing(chat: tuple[Path, Path], tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.txt").write_text("not the agent's to send")
    outbox = chat[1] / "outbox"
    outbox.rmdir()
    outbox.symlink_to(elsewhere)
    sending = take(chat)
    assert sending.files == () and "Nothing was sent from outbox/: it is not a folder of the agent's." in sending.text
    assert (elsewhere / "data.txt").exists()


def test_nothing_in_the_outbox_leaves_nothing_behind(chat: tuple[Path, Path]) -> None:
    assert take(chat) == files_out.Sending("the answer", ())
    assert list((chat[0] / files_out.SENDING).iterdir()) == []
    (chat[1] / "outbox").rmdir()
    assert take(chat, turn="1-2-abc") == files_out.Sending("the answer", ())


def test_a_turn_taken_again_after_a_restart_sends_the_same_and_no_new_file(chat: tuple[Path, Path]) -> None:
    outbox = chat[1] / "outbox"
    (outbox / "a.txt").write_text("a")
    first = take(chat)
    (outbox / "later.txt").write_text("made after the answer")  # for the next answer, not this one
    again = take(chat)
    assert again == first
    assert [p.name for p in outbox.iterdir()] == ["later.txt"]


def test_a_crash_before_the_manifest_takes_the_outbox_again(chat: tuple[Path, Path]) -> None:
    outbox = chat[1] / "outbox"
    (outbox / "a.txt").write_text("a")
    leftover = chat[0] / files_out.SENDING / ".1-1-abc.partial"
    leftover.mkdir(parents=True)
    (leftover / "1").write_text("half")
    [(file, _)] = take(chat).files
    assert Path(file.path).read_text() == "a" and not leftover.exists()


def test_a_crash_after_the_manifest_still_empties_the_outbox(chat: tuple[Path, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    outbox = chat[1] / "outbox"
    (outbox / "a.txt").write_text("a")
    with monkeypatch.context() as crash:
        crash.setattr(files_out, "_remove", lambda *args: None)  # the process died before the removal
        first = take(chat)
    assert (outbox / "a.txt").exists()
    assert take(chat) == first and not (outbox / "a.txt").exists()


def test_a_file_written_anew_after_it_was_taken_stays_for_the_next_answer(chat: tuple[Path, Path],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    outbox = chat[1] / "outbox"
    (outbox / "a.txt").write_text("first version")
    with monkeypatch.context() as crash:
        crash.setattr(files_out, "_remove", lambda *args: None)
        take(chat)
    (outbox / "a.txt").unlink()
    (outbox / "a.txt").write_text("second version, written by a background job")
    take(chat)  # followed again after a restart: the removal is done now, but only of what was taken
    assert (outbox / "a.txt").read_text() == "second version, written by a background job"
    [(file, _)] = take(chat, turn="1-2-abc").files
    assert Path(file.path).read_text() == "second version, written by a background job"


def test_at_most_ten_files_go_with_one_answer_the_rest_wait(chat: tuple[Path, Path]) -> None:
    outbox = chat[1] / "outbox"
    for number in range(12):
        (outbox / f"f{number:02}.txt").write_text(str(number))
    sending = take(chat)
    assert len(sending.files) == files_out.MAX_FILES
    assert sending.text.count("waits for the next answer") == 2
    assert sorted(p.name for p in outbox.iterdir()) == ["f10.txt", "f11.txt"]


def test_names_are_made_safe(chat: tuple[Path, Path]) -> None:
    outbox = chat[1] / "outbox"
    (outbox / "-rf\x1b[31m.txt").write_text("x")
    [(file, _)] = take(chat).files
    assert file.name == "rf_[31m.txt"


def test_a_long_answer_goes_as_a_file_first_with_its_beginning_shown(chat: tuple[Path, Path]) -> None:
    (chat[1] / "outbox" / "chart.png").write_bytes(PNG)
    answer = "# Report\n\n" + "\n\n".join(f"Paragraph {n}: " + "words " * 40 for n in range(100))
    sending = take(chat, answer, limits=FileSettings(answer_as_file_bytes=4096))
    [(whole, _), (chart, _)] = sending.files
    assert (whole.name, whole.kind) == ("answer.md", "file") and Path(whole.path).read_text() == answer
    assert chart.name == "chart.png"
    assert sending.text.startswith("# Report\n\nParagraph 0") and len(sending.text) < 2000
    assert "is in the file answer.md below" in sending.text


def test_a_summary_closes_a_code_block_it_cuts() -> None:
    answer = "Here:\n\n```python\n" + "x = 1\n" * 1000 + "```\n"
    shown = files_out.summary(answer)
    assert shown.count("```") == 2


def test_short_answers_stay_messages_and_zero_turns_it_off(chat: tuple[Path, Path]) -> None:
    long = "y" * 100_000
    assert take(chat, long, limits=FileSettings(answer_as_file_bytes=0)).text == long
    assert take(chat, "short", turn="1-2-abc").files == ()


def test_copies_of_sent_files_are_removed_and_settled_folders_pruned_pending_ones_kept(tmp_path: Path) -> None:
    chats_dir = tmp_path / "chats"
    chat = (chats_dir / "oc_a", chats_dir / "oc_a" / "workspace")
    (chat[1] / "outbox").mkdir(parents=True)
    (chat[1] / "outbox" / "a.txt").write_text("a")
    (chat[1] / "outbox" / "b.txt").write_text("b")
    [(sent, _), (waiting, _)] = take(chat).files
    files_out.discard(sent)
    assert not Path(sent.path).exists()
    folder = Path(sent.path).parent
    assert json.loads((folder / files_out.MANIFEST).read_text())["files"]
    later = folder.stat().st_mtime + files_out.SETTLED_SECONDS + 1
    assert files_out.prune(chats_dir, set(), now=folder.stat().st_mtime + 60) == 0  # the answer may not be stored
    assert files_out.prune(chats_dir, {waiting.path}, now=later) == 0  # an item still names a copy in it
    assert files_out.prune(chats_dir, set(), now=later) == 1
    assert not folder.exists()


def test_prune_never_follows_a_link_an_agent_planted_where_it_looks(tmp_path: Path) -> None:
    """A workspace configured one level below chats_dir (chats/{chat_id}-ws) puts agent-made names where prune
    looks: `sending` there may be a link to any host folder."""
    chats_dir = tmp_path / "chats"
    victim = tmp_path / "victim"
    (victim / "precious").mkdir(parents=True)
    old = time.time() - 30 * 24 * 3600
    os.utime(victim / "precious", (old, old))
    workspace = chats_dir / "oc_abc-ws"
    workspace.mkdir(parents=True)
    (workspace / "sending").symlink_to(victim)
    if os.geteuid() == 0:
        os.chown(workspace, 4321, 4321)  # the agent's, as a configured workspace is
    assert files_out.prune(chats_dir, set()) == 0
    assert (victim / "precious").exists()


def test_files_wait_while_the_chats_unsent_copies_fill_their_room(chat: tuple[Path, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files_out, "PENDING_BYTES", 1000)
    outbox = chat[1] / "outbox"
    (outbox / "a.bin").write_bytes(b"a" * 600)
    (outbox / "b.bin").write_bytes(b"b" * 600)
    first = take(chat)
    assert [file.name for file, _ in first.files] == ["a.bin"]
    assert "outbox/b.bin waits for the next answer: this chat's files still being sent take 600 bytes." in first.text
    assert "waits" in take(chat, turn="1-2-abc").text  # a.bin is not sent yet
    files_out.discard(first.files[0][0])
    assert [file.name for file, _ in take(chat, turn="1-3-abc").files] == ["b.bin"]


def test_names_that_cannot_be_opened_or_encoded_are_refused_and_the_rest_sent(chat: tuple[Path, Path]) -> None:
    outbox = chat[1] / "outbox"
    long_name = "x" * 248 + ".txt"  # with ".caption" it is past the 255 bytes a name may have
    (outbox / long_name).write_text("long")
    (outbox / os.fsdecode(b"r\xff.txt")).write_text("not UTF-8")
    leased = outbox / "leased.txt"
    leased.write_text("held")
    holder = os.open(leased, os.O_RDONLY)
    try:
        fcntl.fcntl(holder, fcntl.F_SETLEASE, fcntl.F_RDLCK)  # a lease its owner may take: opens for reading go on
        sending = take(chat)
    finally:
        fcntl.fcntl(holder, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.close(holder)
    names = sorted(file.name for file, _ in sending.files)
    assert names[:2] == ["leased.txt", "r_.txt"] and names[2].startswith("xxx")  # cut to 100 bytes
    assert sending.text.encode()  # no lone surrogate reaches the answer


def test_a_write_lease_is_refused_not_waited_for_nor_failing_the_turn(chat: tuple[Path, Path]) -> None:
    leased = chat[1] / "outbox" / "leased.txt"
    leased.write_text("held")
    # The holder (the agent; here this process) gets SIGIO when the open asks for the lease: ignored here.
    previous = signal.signal(signal.SIGIO, signal.SIG_IGN)
    holder = os.open(leased, os.O_WRONLY)
    try:
        fcntl.fcntl(holder, fcntl.F_SETLEASE, fcntl.F_WRLCK)  # an open to read it now gets EWOULDBLOCK
        sending = take(chat)
    finally:
        fcntl.fcntl(holder, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.close(holder)
        signal.signal(signal.SIGIO, previous)
    assert sending.files == () and "outbox/leased.txt was not sent: it could not be opened." in sending.text
