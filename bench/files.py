"""Files (issue 13), each against a baseline measured in the same run, on the real orchestrator, the real CLI in the
agent image (the fake Messages API's `RUN_BASH:` makes it run Bash), the fake Feishu serving message resources and
taking uploads and sends through the real lark-oapi client:

- files in: a message of a 5 MiB file (random bytes) and one of a 5 MiB PNG (a 2560x1600 screenshot, scaled down for
  the model) → its turn starting (the fake model receiving the request that names the file); baseline: a text
  message → its turn starting, in the same chat. Each sample starts a fresh session (/new, then a turn), as a
  session's history carries every earlier image to the model.
- files out: the agent writes 1, 10 and 25 MiB of random bytes into /workspace/outbox; from the answer's delivery
  (its last Feishu call) to the file message in the chat, and the upload's own time at the fake (its request's
  headers in → its answer out); baseline: a plain `requests.post` multipart upload of the same bytes to the same
  endpoint from this process.
- Feishu API calls per file in and out: a turn with one file against the same turn without (medians).

    python -m bench.files [--quick]
"""

from __future__ import annotations

import io
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import requests
from PIL import Image

from bench.common import Rig, main, median_p95, ms, new_chat, rig, timed
from orchestrator import inbox
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.feishu import TENANT_TOKEN, Call, FakeFeishu
from tests.harness import AGENT_IMAGE, StoreView, wait_until

Json = dict[str, Any]
MIB = 1024**2
IN_BYTES = 5 * MIB
FILE_UPLOAD = "/open-apis/im/v1/files"
IMAGE_UPLOAD = "/open-apis/im/v1/images"
MAKE_OUTBOX = "mkdir -p /workspace/outbox && "
# (a turn with a file, the same turn without): what the file adds
WITH_AND_WITHOUT = (("a file in", "text"), ("an image in", "text"), ("a file out", "Bash"),
                    ("a file out with a caption", "Bash"))


def run(quick: bool) -> list[str]:
    samples, sizes, upload_samples, call_samples = (3, (1, 10), 1, 2) if quick else (20, (1, 10, 25), 5, 10)
    with rig() as setup:
        setup.configure(AGENT_IMAGE, files={"wait_for_text": 0})  # a message of files only is answered at once
        clock = UploadClock(setup.feishu)
        setup.start()
        chat_id = new_chat()
        _turn(setup, setup.feishu.text_event(chat_id, "start the container"))
        lines = _files_in(setup, chat_id, samples)
        lines += [_files_out(setup, chat_id, clock, mib, upload_samples) for mib in sizes]
        lines += _calls_per_file(setup, chat_id, call_samples)
    return lines


# ---- files in -------------------------------------------------------------------------------------------------


def _files_in(setup: Rig, chat_id: str, samples: int) -> list[str]:
    image = screenshot(IN_BYTES)
    text, file, picture = [], [], []
    for n in range(samples):
        _turn(setup, setup.feishu.text_event(chat_id, "/new"))
        _turn(setup, setup.feishu.text_event(chat_id, f"the new session {n}"))  # the session's start is not timed
        text.append(_turn(setup, setup.feishu.text_event(chat_id, f"baseline {n}"), f"baseline {n}"))
        event = setup.feishu.file_event(chat_id, file_name=f"in-{n}.bin", data=os.urandom(IN_BYTES))
        file.append(_turn(setup, event, f"inbox/{_message_id(event)}/"))
        event = setup.feishu.image_event(chat_id, data=image)
        picture.append(_turn(setup, event, f"inbox/{_message_id(event)}/"))
    base, base_p95 = median_p95(text)
    scaling = statistics.median(timed(lambda: inbox._scaled(image)) for _ in range(3))
    return [f"files in: {what} message -> its turn starting: samples={samples} median={ms(median)} p95={ms(p95)}; "
            f"baseline text message -> its turn starting: median={ms(base)} p95={ms(base_p95)} "
            f"(absolute, this machine); ratio={median / base:.2f}x median{also}"
            for what, (median, p95), also in (
                (f"a {IN_BYTES // MIB} MiB file", median_p95(file), ""),
                (f"a {len(image) / MIB:.1f} MiB PNG 2560x1600", median_p95(picture),
                 f"; scaling it down for the model takes {ms(scaling)} of it (median of 3 in this process)"))]


def screenshot(size: int) -> bytes:
    """A 2560x1600 PNG of about `size` bytes: flat above a band of random pixels (which PNG cannot compress)."""
    width, height = 2560, 1600
    band = size // (3 * width)
    picture = Image.new("RGB", (width, height), "white")
    picture.paste(Image.frombytes("RGB", (width, band), os.urandom(3 * width * band)), (0, height - band))
    out = io.BytesIO()
    picture.save(out, "PNG", compress_level=1)
    return out.getvalue()


# ---- files out ------------------------------------------------------------------------------------------------


class UploadClock:
    """When each upload began and ended at the fake Feishu: its `calls` are stamped once a request's body is in, so
    an upload's own time is taken around its handler (headers in → answer out)."""

    def __init__(self, feishu: FakeFeishu) -> None:
        self.spans: list[tuple[float, float]] = []
        server = feishu._http
        clock, handler = self, server.RequestHandlerClass

        class Timed(handler):  # type: ignore[misc, valid-type]
            def do_POST(self) -> None:
                began = time.monotonic()
                super().do_POST()
                if urlsplit(self.path).path in (FILE_UPLOAD, IMAGE_UPLOAD):
                    clock.spans.append((began, time.monotonic()))

        server.RequestHandlerClass = Timed

    def span_of(self, call: Call) -> float:
        """Seconds the upload `call` took at the fake (its span is noted after its answer is sent: waited for)."""
        began, end = wait_until(lambda: next(((b, e) for b, e in self.spans if b <= call.time <= e), None), 10,
                                f"the span of the upload at {call.time}", 0.001)
        return end - began


def _files_out(setup: Rig, chat_id: str, clock: UploadClock, mib: int, samples: int) -> str:
    to_chat, uploads, bare_wire, bare_trip = [], [], [], []
    for n in range(samples):
        name = f"out-{mib}-{n}.bin"
        calls = _turn_calls(setup, setup.feishu.text_event(
            chat_id, f"RUN_BASH: {MAKE_OUTBOX}head -c {mib}M /dev/urandom > /workspace/outbox/{name} && echo made"))
        upload = next(index for index, call in enumerate(calls) if call.path == FILE_UPLOAD)
        answered = calls[upload - 1].time  # the answer's last call: its card finished
        to_chat.append(next(call.time for call in calls[upload:] if _category(call) == "file send") - answered)
        uploads.append(clock.span_of(calls[upload]))
        data = setup.feishu.uploads[-1].data
        if len(data) != mib * MIB:
            raise RuntimeError(f"{name}: {len(data)} bytes uploaded, not {mib} MiB")
        bare_trip.append(timed(lambda data=data, name=name: _bare_upload(setup.feishu, name, data)))
        bare_wire.append(clock.span_of(next(c for c in reversed(setup.feishu.calls) if c.path == FILE_UPLOAD)))
    (chat, chat_p95), (up, up_p95) = median_p95(to_chat), median_p95(uploads)
    wire, trip = statistics.median(bare_wire), statistics.median(bare_trip)
    return (f"files out {mib} MiB: samples={samples} answer delivered -> file in the chat median={ms(chat)} "
            f"p95={ms(chat_p95)} ({mib / chat:.0f} MiB/s); the upload at the fake median={ms(up)} p95={ms(up_p95)} "
            f"({mib / up:.0f} MiB/s); bare requests.post of the same bytes: at the fake median={ms(wire)} "
            f"({mib / wire:.0f} MiB/s), round trip median={ms(trip)} (absolute, this machine); "
            f"ratio upload={up / wire:.2f}x, delivered -> in the chat={chat / trip:.2f}x of the bare round trip")


def _bare_upload(feishu: FakeFeishu, name: str, data: bytes) -> None:
    """One multipart upload as lark-oapi sends it, with plain requests (not through a proxy of the environment)."""
    with requests.Session() as session:
        session.trust_env = False
        response = session.post(f"{feishu.base_url}{FILE_UPLOAD}", headers={"Authorization": f"Bearer {TENANT_TOKEN}"},
                                data={"file_type": "stream", "file_name": name}, files={"file": (name, data)},
                                timeout=120)
    if response.json().get("code") != 0:
        raise RuntimeError(f"the bare upload failed: {response.text[:300]}")


# ---- Feishu API calls per file --------------------------------------------------------------------------------


def _calls_per_file(setup: Rig, chat_id: str, samples: int) -> list[str]:
    """Each kind of turn `samples` times; the calls a file adds, by category, against the same turn without it."""
    small = os.urandom(64 * 1024)
    picture = screenshot(64 * 1024)
    kinds: dict[str, Callable[[int], Json]] = {
        "text": lambda n: setup.feishu.text_event(chat_id, f"calls {n}"),
        "a file in": lambda n: setup.feishu.file_event(chat_id, file_name=f"calls-{n}.bin", data=small),
        "an image in": lambda n: setup.feishu.image_event(chat_id, data=picture),
        "Bash": lambda n: setup.feishu.text_event(chat_id, f"RUN_BASH: echo made {n}"),
        "a file out": lambda n: setup.feishu.text_event(
            chat_id, f"RUN_BASH: {MAKE_OUTBOX}head -c 64K /dev/urandom > /workspace/outbox/c{n}.bin && echo made {n}"),
        "a file out with a caption": lambda n: setup.feishu.text_event(
            chat_id, f"RUN_BASH: head -c 64K /dev/urandom > /tmp/c{n}.bin && send-file /tmp/c{n}.bin 'caption {n}' "
                     f"&& echo made {n}"),
    }
    counts: dict[str, list[Counter[str]]] = {kind: [] for kind in kinds}
    for n in range(samples):
        for kind, event in kinds.items():
            counts[kind].append(Counter(_category(call) for call in _turn_calls(setup, event(n))))
    totals = {kind: [sum(found.values()) for found in turns] for kind, turns in counts.items()}
    shown = ", ".join(f"{kind} {statistics.median(found):g} ({min(found)}-{max(found)})"
                      for kind, found in totals.items())
    added = "; ".join(_added(counts[kind], counts[base], f"{kind} adds") for kind, base in WITH_AND_WITHOUT)
    return [f"files: Feishu API calls per turn, median (min-max) of {samples}: {shown} (a streaming card's updates "
            "vary with timing)",
            f"files: Feishu API calls per file: {added}"]


def _added(ours: list[Counter[str]], base: list[Counter[str]], what: str) -> str:
    """The median calls of each category `ours` has more than `base` (a file's own calls)."""
    categories = sorted(set().union(*ours, *base))
    more = {c: statistics.median(t[c] for t in ours) - statistics.median(t[c] for t in base) for c in categories}
    total = statistics.median(sum(t.values()) for t in ours) - statistics.median(sum(t.values()) for t in base)
    return f"{what} {total:+g} (" + ", ".join(f"{c} {n:+g}" for c, n in more.items() if n) + ")"


def _category(call: Call) -> str:
    """What a Feishu API call does, for counting: a message's send by its type, a download, an upload, a card's
    update, a reaction."""
    if "/resources/" in call.path:
        return "download"
    if call.path in (FILE_UPLOAD, IMAGE_UPLOAD):
        return "upload"
    if call.method == "POST" and call.path.startswith("/open-apis/im/v1/messages") and isinstance(call.body, dict) \
            and "msg_type" in call.body:
        return f"{'card' if call.body['msg_type'] == 'interactive' else call.body['msg_type']} send"
    if "/reactions" in call.path:
        return "reaction"
    if call.path.startswith("/open-apis/cardkit/") or call.method == "PATCH":
        return "card update"
    return "other"


# ---- one turn -------------------------------------------------------------------------------------------------


def _turn(setup: Rig, event: Json, needle: str | None = None) -> float:
    """Push a message and wait until it and everything it sends are delivered; with a `needle`, the seconds from the
    push to the fake model receiving the first request naming it (the turn starting)."""
    seen = len(setup.api.requests)
    pushed = time.monotonic()
    setup.feishu.push_event(event)
    started = _requested(setup.api, seen, needle) if needle is not None else pushed
    _settle(setup, event)
    return started - pushed


def _turn_calls(setup: Rig, event: Json) -> list[Call]:
    """The Feishu API calls of one turn, from its message to everything it sent."""
    marker = len(setup.feishu.calls)
    _turn(setup, event)
    return setup.feishu.calls[marker:]


def _requested(api: FakeAnthropic, seen: int, needle: str, timeout: float = 120) -> float:
    """When the fake model got the first request after the first `seen` that names `needle` (time.monotonic(), taken
    when a new request is noticed, every millisecond, before it is searched)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = len(api.requests)
        if count > seen:
            noticed = time.monotonic()
            if any(needle in json.dumps(body) for body in api.requests[seen:count]):
                return noticed
            seen = count
        time.sleep(0.001)
    raise TimeoutError(f"no request naming {needle!r} within {timeout} s")


def _settle(setup: Rig, event: Json, timeout: float = 120) -> None:
    """Wait until the message is delivered and its chat's outbox holds nothing pending (its files went out too)."""
    store = StoreView(setup.data / "orchestrator.db")
    chat_id, message_id = event["event"]["message"]["chat_id"], _message_id(event)

    def state() -> str | None:
        found = next((m["state"] for m in store.messages(chat_id) if m["message_id"] == message_id), None)
        pending = store._rows("select id from outbox where chat_id = ? and state = 'pending'", chat_id)
        return found if found in ("delivered", "failed") and not pending else None

    if wait_until(state, timeout, f"{message_id} delivered", 0.01) == "failed":
        raise RuntimeError(f"{message_id} failed: {[m.text for m in setup.feishu.messages(chat_id)][-1:]}")


def _message_id(event: Json) -> str:
    return str(event["event"]["message"]["message_id"])


if __name__ == "__main__":
    main(run, __doc__ or "")
