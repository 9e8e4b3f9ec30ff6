"""Files out: what the agent leaves in its outbox is taken as hostile input, copied into root's folder once per turn,
and the answer says what was refused (real folders, links, FIFOs; the agent's uid is this test's own)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from orchestrator import files_out
from orchestrator.config import FileSettings

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100
UID = os.getuid()


@pytest.fixture
def chat(tmp_path: Path) -> tuple[Path, Path]:
    """(the chat's root folder, its workspace with an outbox)."""
    root = tmp_path / "chat"
    workspace = root / "workspace"
    (workspace / "outbox").mkdir(parents=True)
    return root, workspace


def take(chat: tuple[Path, Path], answer: str = "the answer", turn: str = "1-1-abc",
         limits: FileSettings | None = None) -> files_out.Sending:
    return files_out.take(chat[0], chat[1], turn, answer, UID, limits or FileSettings())


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
    assert sending.files == () and "Nothing was sent from outbox/: it is not a folder." in sending.text
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


def test_a_crash_after_the_manifest_still_empties_the_outbox(chat: tuple[Path, Path]) -> None:
    outbox = chat[1] / "outbox"
    (outbox / "a.txt").write_text("a")
    first = take(chat)
    (outbox / "a.txt").write_text("a")  # as if the removal had not happened before the crash
    assert take(chat) == first and not (outbox / "a.txt").exists()


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


def test_copies_of_sent_files_are_removed_and_old_folders_pruned(chat: tuple[Path, Path], tmp_path: Path) -> None:
    (chat[1] / "outbox" / "a.txt").write_text("a")
    [(file, _)] = take(chat).files
    files_out.discard(file)
    assert not Path(file.path).exists()
    folder = Path(file.path).parent
    assert json.loads((folder / files_out.MANIFEST).read_text())["files"]
    assert files_out.prune(tmp_path, now=folder.stat().st_mtime + 60) == 0  # the answer may not be stored yet
    assert files_out.prune(tmp_path, now=folder.stat().st_mtime + files_out.SENT_KEEP_SECONDS + 1) == 1
    assert not folder.exists()


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
