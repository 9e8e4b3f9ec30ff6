"""Files out under faults (issue 13): the agents of several chats write 1 to 3 files per message into their outbox
(plain files, PNG images, files sent with `send-file` and a caption) while the orchestrator is killed with -9 at
random moments and at chosen ones: while a file's send is held before Feishu takes it (after its upload, so between
the upload and the send), right after an answer is delivered, right after an upload. Every message must be answered
once; every file must arrive in its chat exactly once, as its kind, with its bytes (and its caption once); nothing
else may arrive; a file is uploaded at most twice (once is the norm: a kill between an upload and the storing of its
key uploads it again, which is counted)."""

from __future__ import annotations

import base64
import io
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from bench.faults_lib.rig import Result, Rig, Sent, wait_for
from tests.fakes.feishu import BotMessage
from tests.harness import chat

CAPTION = "caption of "  # a caption's text begins with it
KIB = 1024


@dataclass(frozen=True)
class Expected:
    """A file a message's agent writes: where it must arrive, as what, with which bytes and caption."""

    chat_id: str
    kind: Literal["image", "file"]
    name: str
    data: bytes
    caption: str  # "" for none
    command: str  # what writes it into the outbox


class FilesRig(Rig):
    """A rig whose answers leave out the files and captions, which reply to the user's message too."""

    def replies(self, sent: Sent) -> list[BotMessage]:
        return [m for m in super().replies(sent) if m.msg_type not in ("image", "file")
                and not (m.msg_type == "text" and m.text.startswith(CAPTION))]


def files_out(quick: bool, rng: random.Random) -> Result:
    rounds, chats, repeats = (2, 2, 1) if quick else (15, 4, 2)
    result = Result("files_out")
    expected: list[Expected] = []
    with FilesRig("files_out", result, scheduler={"queue_depth": 100}) as rig:
        ids = [chat() for _ in range(chats)]
        rig.start()
        in_flight = 0
        for n in range(rounds):
            for i, chat_id in enumerate(ids):
                _say(rig, expected, chat_id, f"fo-{n}-{i}", rng)
            time.sleep(rng.uniform(0, 3))
            in_flight += not _all_arrived(rig, expected)
            _restart(rig)
        targeted, target_chat = [], chat()
        _settled(rig)  # each chosen moment is its message's alone
        for n in range(repeats):
            for name, label, moment in KILL_MOMENTS:
                hit = moment(rig, lambda tag=f"fo-{name}-{n}": _say(rig, expected, target_chat, tag, rng))
                targeted.append(f"{label}: {'hit' if hit else 'missed'}")
                _restart(rig)
                _settled(rig)
        settled = _settled(rig)
        rig.tally()
        uploads = _check_files(rig, result, expected)
        left = _left_behind(rig, [*ids, target_chat])
    sizes = sum(len(file.data) for file in expected)
    kinds = Counter("image" if f.kind == "image" else "with a caption" if f.caption else "file" for f in expected)
    result.notes.append(f"{len(rig.sent)} messages over {chats + 1} chats wrote {len(expected)} files "
                        f"({dict(kinds)}, {sizes / KIB**2:.1f} MiB); {rounds} kills at random moments, {in_flight} "
                        f"with files not yet in the chat, and {len(targeted)} at chosen ones; settled: {settled}")
    result.notes.append("chosen moments: kill -9 " + "; ".join(targeted))
    result.notes.append(f"uploads per file: {dict(sorted(Counter(uploads).items()))} (a second one: a kill between an "
                        "upload and the storing of its key)")
    if left:
        result.notes.append(f"weakness: {left}")
    return result


def _say(rig: Rig, expected: list[Expected], chat_id: str, tag: str, rng: random.Random) -> list[Expected]:
    """A message whose Bash command writes 1 to 3 files into the outbox, then echoes `<tag>-done`; its files."""
    files = [_file(chat_id, f"{tag}-{j}", rng) for j in range(rng.randint(1, 3))]
    expected += files
    commands = " && ".join(file.command for file in files)
    rig.say(chat_id, f"RUN_BASH: mkdir -p /workspace/outbox && {commands} && echo {tag}-done", f"{tag}-done")
    return files


def _file(chat_id: str, tag: str, rng: random.Random) -> Expected:
    """A plain file of 1 KiB to 4 MiB (its tag repeated: its bytes are its own), a small PNG of random pixels, or a
    file sent with `send-file` and a caption."""
    kind = rng.choice(["file", "image", "caption"])
    if kind == "image":
        picture = Image.frombytes("RGB", (16, 16), rng.randbytes(16 * 16 * 3))
        out = io.BytesIO()
        picture.save(out, "PNG")
        data = out.getvalue()
        return Expected(chat_id, "image", f"{tag}.png", data, "",
                        f"echo {base64.b64encode(data).decode()} | base64 -d > /workspace/outbox/{tag}.png")
    size = rng.randint(1, 4 * KIB) * KIB
    data = ((tag + "\n").encode() * (size // len(tag) + 1))[:size]
    make = f"yes {tag} | head -c {size} >"
    if kind == "file":
        return Expected(chat_id, "file", f"{tag}.bin", data, "", f"{make} /workspace/outbox/{tag}.bin")
    return Expected(chat_id, "file", f"{tag}.txt", data, f"{CAPTION}{tag}",
                    f"{make} /tmp/{tag}.txt && send-file /tmp/{tag}.txt '{CAPTION}{tag}'")


def _restart(rig: Rig) -> None:
    rig.kill()
    rig.feishu.drop_held_sends()  # a send held when the bot died is never taken
    rig.start()
    rig.redeliver_unacked()


# ---- the chosen moments: each says its message and waits for its moment (True: it came); then the bot is killed ----


Say = Callable[[], list[Expected]]


def _send_held(rig: Rig, say: Say) -> bool:
    """A file of the message uploaded, its send held before Feishu takes it."""
    rig.feishu.hold_sends("image", "file")
    say()
    return bool(wait_for(lambda: rig.feishu.held_sends, 60, 0.002))


def _answer_delivered(rig: Rig, say: Say) -> bool:
    say()
    return bool(wait_for(lambda: rig.answered(rig.sent[-1]), 60, 0.002))


def _uploaded(rig: Rig, say: Say) -> bool:
    """One of the message's files uploaded."""
    ours = {file.data for file in say()}
    return bool(wait_for(lambda: any(upload.data in ours for upload in rig.feishu.uploads), 60, 0.001))


KILL_MOMENTS: list[tuple[str, str, Callable[[Rig, Say], bool]]] = [
    ("held", "when a file is uploaded and its send held before Feishu takes it", _send_held),
    ("answered", "right after the answer is delivered", _answer_delivered),
    ("uploaded", "right after a file's upload", _uploaded),
]


# ---- the checks -----------------------------------------------------------------------------------------------


def _all_arrived(rig: Rig, expected: list[Expected]) -> bool:
    arrived = {file.data for chat_id in {f.chat_id for f in expected} for file in rig.feishu.received_files(chat_id)}
    return all(file.data in arrived for file in expected)


def _settled(rig: Rig) -> bool:
    """Wait until every message is delivered or failed and nothing is pending in the outbox (the files went too)."""
    return rig.settle(timeout=180) and bool(
        wait_for(lambda: not rig.store._rows("select id from outbox where state = 'pending'"), 120, 0.25))


def _check_files(rig: Rig, result: Result, expected: list[Expected]) -> list[int]:
    """Each file a trial: once in its chat, as its kind, under its name (a file's), with its caption once; nothing
    else in any chat. The uploads of each file, counted."""
    uploads = Counter(upload.data for upload in rig.feishu.uploads)
    for file in expected:
        received = [r for r in rig.feishu.received_files(file.chat_id) if r.data == file.data]
        captions = sum(m.text == file.caption for m in rig.feishu.messages(file.chat_id)) if file.caption else 0
        result.trials += 1
        problem = ""
        if not received:
            result.lost += 1
            problem = "never arrived"
        elif len(received) > 1:
            result.duplicated += 1
            problem = f"arrived {len(received)} times"
        elif received[0].kind != file.kind or (file.kind == "file" and received[0].name != file.name):
            problem = f"arrived as {received[0].kind} {received[0].name!r}"
        elif captions != bool(file.caption) or uploads[file.data] > 2:
            problem = f"caption {captions} times, uploaded {uploads[file.data]} times"
        result.passed += not problem
        if problem:
            result.problems.append(f"{file.chat_id} {file.name} ({len(file.data)} bytes): {problem}")
    wanted = {file.data for file in expected}
    for chat_id in {file.chat_id for file in expected}:
        extra = [(r.kind, r.name) for r in rig.feishu.received_files(chat_id) if r.data not in wanted]
        if extra:
            result.problems.append(f"{chat_id}: files nobody sent arrived: {extra}")
    return [uploads[file.data] for file in expected]


def _left_behind(rig: Rig, chat_ids: list[str]) -> str:
    """Files left in an outbox, or copies left in root's sending folders once everything went out."""
    chats = rig.data / "chats"
    outboxes = [p for c in chat_ids for p in (chats / c / "workspace" / "outbox").glob("*")]
    copies = [p for c in chat_ids for p in (chats / c / "sending").glob("*/*") if p.name != "manifest.json"]
    if not (outboxes or copies):
        return ""
    return (f"{len(outboxes)} file(s) left in the outboxes, {len(copies)} copies left in sending/ after everything "
            f"went out: {[str(p.relative_to(chats)) for p in (outboxes + copies)[:5]]}")
