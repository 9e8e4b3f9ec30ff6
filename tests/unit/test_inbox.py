"""Files that come with a message (orchestrator/inbox.py): names made safe, limits, what the prompt says."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import random
import zlib
from collections.abc import Callable, Iterator

import pytest
from loguru import logger
from PIL import Image

from orchestrator import inbox
from orchestrator.channels import Attachment, AttachmentRefused
from orchestrator.config import FileSettings
from orchestrator.states import State
from orchestrator.store import MessageRecord


def png(width: int, height: int) -> bytes:
    """A PNG's signature and header chunk: what the size check reads."""
    return (b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR" + width.to_bytes(4, "big")
            + height.to_bytes(4, "big") + b"\x08\x06\x00\x00\x00" + b"\x00" * 75)


PNG = png(1, 1)
MESSAGE = MessageRecord(id=1, message_id="om_1", chat_id="oc_1", sender_id="ou_1", thread_id="", text="what is this?",
                        attachments="", state=State.RUNNING, turn=None, display=None, error=None, answer=None,
                        cost_usd=None, duration_ms=None, received_at=0.0, updated_at=0.0)


def with_files(*attachments: Attachment, text: str = "what is this?") -> MessageRecord:
    return dataclasses.replace(MESSAGE, text=text, attachments=inbox.encode_attachments(attachments))


def fetching(files: dict[str, bytes]) -> inbox.Fetch:
    async def fetch(message_id: str, attachment: Attachment, max_bytes: int) -> bytes:
        data = files[attachment.key]
        if len(data) > max_bytes:
            raise AttachmentRefused(f"it is larger than the limit of {max_bytes} bytes")
        return data
    return fetch


@pytest.mark.parametrize(("name", "safe"), [
    ("report.csv", "report.csv"),
    ("../../etc/passwd", "passwd"),
    ("..\\..\\boot.ini", "boot.ini"),
    ("-rf", "rf"),
    (".bashrc", "bashrc"),
    ("a\x00b\nc.txt", "a_b_c.txt"),
    (". .bashrc", "bashrc"),
    (". -rf", "rf"),
    ("evil\u202etxt.exe", "evil_txt.exe"),
    ("", "file"),
    ("..", "file"),
])
def test_hostile_names_become_safe_ones(name: str, safe: str) -> None:
    made = inbox.safe_name(name, set())
    assert made == safe
    assert len(made.encode()) <= inbox.NAME_BYTES and "/" not in made and not made.startswith(("-", "."))


@pytest.mark.parametrize("name", ["x" * 500 + ".tar.gz", "名前" * 60 + ".txt", "a" * 300])
def test_a_long_name_is_cut_to_its_bound_and_keeps_its_extension(name: str) -> None:
    made = inbox.safe_name(name, set())
    assert len(made.encode()) <= inbox.NAME_BYTES and made.endswith(name.rpartition(".")[2][-16:])
    made.encode().decode()  # whole characters: a multi-byte one is never cut in two


def test_a_name_taken_already_gets_a_number() -> None:
    assert inbox.safe_name("a.txt", {"a.txt", "a (2).txt"}) == "a (3).txt"


def test_an_image_goes_as_a_file_and_a_block_and_the_prompt_says_where() -> None:
    message = with_files(Attachment("image", "img_1", ""), Attachment("file", "file_1", "../log.txt"))
    made = asyncio.run(inbox.prepare(message, "7-1-abc", FileSettings(), fetching({"img_1": PNG, "file_1": b"log"})))
    assert made.contents == {"image-1.png": PNG, "log.txt": b"log"}
    assert made.files == (("7-1-abc.files/image-1.png", "inbox/om_1/image-1.png"),
                          ("7-1-abc.files/log.txt", "inbox/om_1/log.txt"))
    [block] = made.images
    assert block["source"] == {"type": "base64", "media_type": "image/png", "data": base64.b64encode(PNG).decode()}
    assert made.text.startswith("what is this?\n\nFiles sent with this message, saved in your workspace:\n")
    assert "- inbox/om_1/image-1.png (image, 104 bytes, shown to you with this message)" in made.text
    assert "- inbox/om_1/log.txt (file, 3 bytes)" in made.text


def test_files_alone_and_images_the_model_cannot_take() -> None:
    message = with_files(Attachment("image", "img_1", ""), text="")
    made = asyncio.run(inbox.prepare(message, "t", FileSettings(), fetching({"img_1": b"BM not a png"})))
    assert made.text.startswith("(The user sent only these files.)") and made.images == ()
    assert "not shown to you directly" in made.text and made.contents == {"image-1.bin": b"BM not a png"}


def test_a_file_over_the_limit_is_refused_naming_it_and_the_limit() -> None:
    message = with_files(Attachment("file", "f1", "a.bin"), Attachment("file", "f2", "big.bin"))
    limits = FileSettings(max_bytes=10, message_bytes=15)
    with pytest.raises(AttachmentRefused, match=r"big\.bin: it is larger than the limit of 7 bytes"):
        asyncio.run(inbox.prepare(message, "t", limits, fetching({"f1": b"12345678", "f2": b"12345678"})))


def test_a_message_without_files_is_its_text() -> None:
    made = asyncio.run(inbox.prepare(MESSAGE, "t", FileSettings(), fetching({})))
    assert made == inbox.Inbound("what is this?", {}, (), ())


def test_only_images_the_model_surely_takes_go_as_blocks() -> None:
    """One the API refuses stays in the CLI's session and fails every later turn: too wide, unreadable, too many."""
    keys = {"wide": png(9000, 10), "broken": b"\x89PNG\r\n\x1a\n" + b"\x00" * 20,
            **{f"ok{n}": png(100, 100) for n in range(6)}}
    message = with_files(*(Attachment("image", key, "") for key in keys))
    made = asyncio.run(inbox.prepare(message, "t", FileSettings(), fetching(keys)))
    assert len(made.images) == inbox.IMAGE_BLOCKS  # the first five of the six that fit
    assert made.text.count("shown to you with this message") == 5 and made.text.count("not shown") == 3
    assert len(made.contents) == 8  # every one is a file all the same


@pytest.mark.parametrize(("data", "size"), [
    (png(640, 480), (640, 480)),
    (b"GIF89a" + (300).to_bytes(2, "little") + (200).to_bytes(2, "little") + b"\x00" * 10, (300, 200)),
    (b"\xff\xd8\xff\xe0" + (16).to_bytes(2, "big") + b"JFIF" + b"\x00" * 10
     + b"\xff\xc0\x00\x11\x08" + (480).to_bytes(2, "big") + (640).to_bytes(2, "big") + b"\x03", (640, 480)),
    (b"RIFF\x00\x00\x00\x00WEBPVP8X" + b"\x00" * 8 + (799).to_bytes(3, "little") + (599).to_bytes(3, "little"),
     (800, 600)),
    (b"\xff\xd8\xff\xe0\x00\x00", None),  # a segment length that would loop: no size
    (b"not an image", None),
])
def test_image_sizes_are_read_from_headers(data: bytes, size: tuple[int, int] | None) -> None:
    assert inbox.image_size(data) == size


def test_the_message_total_is_named_when_it_runs_out() -> None:
    message = with_files(Attachment("file", "f1", "a.bin"), Attachment("file", "f2", "b.bin"))
    with pytest.raises(AttachmentRefused, match=r"b\.bin: the files of one message are over the limit of 8 bytes"):
        asyncio.run(inbox.prepare(message, "t", FileSettings(max_bytes=10, message_bytes=8),
                                  fetching({"f1": b"12345678", "f2": b"1"})))


def encoded(image: Image.Image, kind: str) -> bytes:
    out = io.BytesIO()
    image.save(out, kind)
    return out.getvalue()


def noise(width: int, height: int) -> Image.Image:
    """Random pixels: no encoder makes them small."""
    return Image.frombytes("RGB", (width, height), random.Random(13).randbytes(width * height * 3))


def prepared(images: dict[str, bytes]) -> inbox.Inbound:
    message = with_files(*(Attachment("image", key, "") for key in images))
    return asyncio.run(inbox.prepare(message, "t", FileSettings(), fetching(images)))


def decoded(block: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(block["source"]["data"])))


@pytest.fixture
def warnings_logged() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(f"{m.record['extra'].get('chat_id')} {m.record['message']}"),
                      level="WARNING", format="{message}")
    yield lines
    logger.remove(sink)


def test_a_large_image_is_scaled_down_for_the_model_and_kept_whole_in_the_workspace() -> None:
    original = encoded(Image.linear_gradient("L").resize((3000, 1500)).convert("RGB"), "PNG")
    made = prepared({"img": original})
    [block] = made.images
    assert block["source"]["media_type"] == "image/png" and decoded(block).size == (2000, 1000)  # the aspect kept
    assert made.contents == {"image-1.png": original}
    assert "(image, " in made.text and ", shown to you scaled down to 2000x1000)" in made.text


def test_a_noisy_png_over_the_byte_limit_goes_as_a_jpeg_within_it() -> None:
    original = encoded(noise(1500, 1400), "PNG")
    assert len(original) > 6_000_000
    [block] = prepared({"img": original}).images
    assert block["source"]["media_type"] == "image/jpeg"
    assert len(base64.b64decode(block["source"]["data"])) <= inbox.IMAGE_BLOCK_BYTES
    assert max(decoded(block).size) <= inbox.IMAGE_BLOCK_PIXELS and decoded(block).format == "JPEG"


def test_a_format_the_model_does_not_take_goes_converted() -> None:
    original = encoded(Image.new("RGB", (300, 200), "teal"), "BMP")
    made = prepared({"img": original})
    [block] = made.images
    assert block["source"]["media_type"] == "image/png" and decoded(block).size == (300, 200)
    assert made.contents == {"image-1.bin": original} and "shown to you with this message as PNG" in made.text


def test_a_transparent_image_that_must_be_a_jpeg_is_flattened_on_white() -> None:
    picture = noise(2400, 1600).convert("RGBA")
    picture.paste((0, 0, 0, 0), (1200, 0, 2400, 1600))  # the right half transparent; the left too big for a PNG
    [block] = prepared({"img": encoded(picture, "TIFF")}).images
    shown = decoded(block)
    assert block["source"]["media_type"] == "image/jpeg" and shown.size == (2000, 1333)
    assert all(channel >= 250 for channel in shown.getpixel((1900, 600)))


def test_a_photo_is_shown_the_way_up_it_was_taken() -> None:
    orientation = Image.Exif()
    orientation[0x0112] = 6  # rotated 90° clockwise
    out = io.BytesIO()
    Image.new("RGB", (4000, 3000), "red").save(out, "JPEG", exif=orientation.tobytes())
    [block] = prepared({"img": out.getvalue()}).images
    assert block["source"]["media_type"] == "image/jpeg" and decoded(block).size == (1500, 2000)


def png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header says width x height (its checksum right): a few bytes that would decode to
    width * height pixels."""
    data = bytearray(encoded(Image.new("RGB", (1, 1)), "PNG"))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


@pytest.mark.parametrize("bomb", [
    pytest.param(lambda: png_claiming(100_000, 100_000), id="10-gigapixel-header"),
    pytest.param(lambda: encoded(Image.new("1", (8000, 8000)), "PNG"), id="64-megapixel-bilevel"),
])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, before inbox refuses it
def test_a_decompression_bomb_is_a_file_only(bomb: Callable[[], bytes], warnings_logged: list[str]) -> None:
    data = bomb()
    assert len(data) < 100_000
    made = prepared({"img": data})
    assert made.images == () and made.contents == {"image-1.png": data} and "not shown to you directly" in made.text
    assert [line for line in warnings_logged if line.startswith("oc_1 an image") and "could not be scaled" in line]


@pytest.mark.parametrize("data", [
    pytest.param(encoded(noise(2400, 1200), "PNG")[:4_000_000], id="truncated-png"),
    pytest.param(encoded(noise(2400, 1800), "JPEG")[:100_000], id="truncated-jpeg"),
    pytest.param(b"BM" + bytes(range(256)) * 20, id="corrupt-bmp"),
    pytest.param(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 3000 3000\n", id="eps-not-decoded"),
])
def test_an_image_that_cannot_be_read_is_a_file_only(data: bytes, warnings_logged: list[str]) -> None:
    made = prepared({"img": data})
    assert made.images == () and list(made.contents.values()) == [data] and "not shown to you directly" in made.text
    assert any(line.startswith("oc_1 an image") for line in warnings_logged)


def test_scaled_images_count_against_the_limits_of_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    wide = encoded(Image.linear_gradient("L").resize((2100, 100)), "PNG")
    made = prepared({f"wide{n}": wide for n in range(inbox.IMAGE_BLOCKS + 2)})
    assert len(made.images) == inbox.IMAGE_BLOCKS and made.text.count("not shown to you directly") == 2

    big = encoded(noise(2400, 1600), "PNG")
    [block] = prepared({"big": big}).images
    scaled = len(base64.b64decode(block["source"]["data"]))
    assert len(big) > 2 * scaled  # so that the bytes sent, not the bytes received, are what is counted
    monkeypatch.setattr(inbox, "IMAGE_BLOCKS_BYTES", 2 * scaled)
    made = prepared({f"big{n}": big for n in range(3)})
    assert len(made.images) == 2 and made.text.count("not shown to you directly") == 1 and len(made.contents) == 3
