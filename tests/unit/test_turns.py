from pathlib import Path

from orchestrator.turns import OutputReader, TurnFiles


def test_reader_returns_only_complete_new_lines(tmp_path: Path) -> None:
    path = tmp_path / "output.jsonl"
    reader = OutputReader(path)
    assert reader.new_lines() == []  # not written yet
    path.write_bytes(b'{"a":1}\n{"b":')
    assert reader.new_lines() == ['{"a":1}']
    with path.open("ab") as f:
        f.write(b'2}\n{"c":3}\n')
    assert reader.new_lines() == ['{"b":2}', '{"c":3}']
    assert reader.new_lines() == []
    with path.open("ab") as f:
        f.write(b"tail without newline")
    assert reader.rest() == ["tail without newline"]


def test_reader_handles_multibyte_text_split_across_reads(tmp_path: Path) -> None:
    path = tmp_path / "output.jsonl"
    data = "你好，世界\n".encode()
    path.write_bytes(data[:4])
    reader = OutputReader(path)
    assert reader.new_lines() == []
    path.write_bytes(data)
    assert reader.new_lines() == ["你好，世界"]


def test_exit_code_and_pid_only_when_complete(tmp_path: Path) -> None:
    files = TurnFiles(host_dir=tmp_path, container_dir="/turns/x")
    assert files.exit_code() is None and files.pid() is None and files.stderr() == ""
    (tmp_path / "exit_code").write_text("")
    assert files.exit_code() is None
    (tmp_path / "exit_code").write_text("137\n")
    (tmp_path / "pid").write_text("42\n")
    (tmp_path / "stderr").write_text("x" * 10_000 + "last words")
    assert files.exit_code() == 137 and files.pid() == 42
    assert files.stderr().endswith("last words") and len(files.stderr()) == 4096


def test_prune_keeps_the_newest_finished_turns_and_never_a_running_one(tmp_path: Path) -> None:
    import os

    from orchestrator.turns import prune

    turns_dir = tmp_path / "oc_a" / "turns"
    for n in range(6):
        turn = turns_dir / f"{n}-1"
        turn.mkdir(parents=True)
        if n != 0:
            (turn / "exit_code").write_text("0")
        os.utime(turn, (n, n))
    (turns_dir / "9-1").mkdir()  # running: no exit code yet
    assert prune(tmp_path, keep=2, busy={"1-1"}) == 2
    assert sorted(p.name for p in turns_dir.iterdir()) == ["0-1", "1-1", "4-1", "5-1", "9-1"]
