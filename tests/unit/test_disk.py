"""disk.measure walks an agent's folders (hostile: links, deep trees, many files) and counts allocated blocks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator import disk, untrusted

MiB = 1024**2


def allocated(path: Path) -> int:
    return path.lstat().st_blocks * 512


def test_counts_the_blocks_of_every_entry_below_the_folders(tmp_path: Path) -> None:
    work, claude = tmp_path / "workspace", tmp_path / "claude"
    (work / "src" / "deep").mkdir(parents=True)
    (work / "src" / "deep" / "data.bin").write_bytes(os.urandom(MiB))
    (work / "notes.txt").write_text("hello")
    claude.mkdir()
    (claude / "session.jsonl").write_bytes(os.urandom(200_000))
    measured = disk.measure([work, claude])
    everything = [p for top in (work, claude) for p in top.rglob("*")]
    assert measured.entries == len(everything) == 5
    assert measured.used == sum(allocated(p) for p in everything)
    assert measured.used >= MiB + 200_000
    assert not measured.exhausted_entries


def test_counts_blocks_not_sizes(tmp_path: Path) -> None:
    with (tmp_path / "sparse").open("wb") as file:
        file.truncate(10 * 1024**3)  # 10 GiB long, nothing written
    assert disk.measure([tmp_path]).used < MiB


def test_does_not_follow_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(os.urandom(4 * MiB))
    folder = tmp_path / "workspace"
    folder.mkdir()
    (folder / "to-file").symlink_to(outside / "big")
    (folder / "to-folder").symlink_to(outside)
    (folder / "to-root").symlink_to("/")
    measured = disk.measure([folder])
    assert measured.entries == 3 and measured.used < MiB
    linked_top = tmp_path / "linked-top"
    linked_top.symlink_to(outside)
    assert disk.measure([linked_top]).used == 0  # the folder itself swapped for a link: not walked


def test_a_folder_swapped_for_a_link_during_the_walk_is_not_followed(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(os.urandom(4 * MiB))
    top = tmp_path / "workspace"
    (top / "sub").mkdir(parents=True)
    real_open = untrusted.open_beneath

    def swap_then_open(dir_fd: int, name: str, owner: int | None, folder: bool = False) -> int:
        if name == "sub" and not (top / "sub").is_symlink():  # listed as a folder, a link by the time it is opened
            (top / "sub").rmdir()
            (top / "sub").symlink_to(outside)
        return real_open(dir_fd, name, owner, folder)

    monkeypatch.setattr(untrusted, "open_beneath", swap_then_open)
    assert disk.measure([top]).used < MiB
    assert (top / "sub").is_symlink()  # the swap happened


def test_missing_folders_count_nothing(tmp_path: Path) -> None:
    measured = disk.measure([tmp_path / "absent", tmp_path / "also-absent"])
    assert (measured.used, measured.entries) == (0, 0)


def test_stops_at_max_entries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(disk, "MAX_ENTRIES", 5)
    for n in range(50):
        (tmp_path / f"f{n}").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more").write_bytes(b"x")
    measured = disk.measure([tmp_path, tmp_path / "sub"])
    assert measured.entries == 5
    assert measured.exhausted_entries


def test_a_tree_deeper_than_a_path_can_be_long(tmp_path: Path) -> None:
    """An agent can nest folders past PATH_MAX (4096) with relative mkdirs; what is down there still counts."""
    top = tmp_path / "workspace"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    name = "d" * 200
    try:
        for _ in range(30):  # 30 × 201 characters: past PATH_MAX
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        file = os.open("hidden", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(file, os.urandom(MiB))
        os.close(file)
    finally:
        os.close(fd)
    open_fds = len(os.listdir("/proc/self/fd"))
    measured = disk.measure([top])
    assert len(os.listdir("/proc/self/fd")) == open_fds  # every folder it opened is closed
    assert measured.entries == 31
    assert measured.used >= MiB


def test_a_tree_deeper_than_max_depth_is_over_any_budget(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(disk, "MAX_DEPTH", 4)
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    assert not disk.measure([tmp_path]).exhausted_entries
    (tmp_path / "a" / "b" / "c" / "d" / "e").mkdir(parents=True)
    measured = disk.measure([tmp_path])
    assert measured.too_deep and measured.exhausted_entries


def test_human_sizes() -> None:
    assert [disk.human(n) for n in (0, 1023, 1024, 5 * MiB // 2, 10 * 1024**3)] == \
        ["0 bytes", "1023 bytes", "1.0 KiB", "2.5 MiB", "10.0 GiB"]
