"""Hypothesis strategies for malformed and hostile Feishu events: the `event` part of im.message.receive_v1
(what `parse_message_event` reads) and whole v2 envelopes (what the long connection carries)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from tests.fakes.feishu import FakeFeishu

BOT = "ou_bot"  # FakeFeishu's bot open_id
HOSTILE_CHAT_IDS = (
    "../../etc", "..", ".", "/etc/passwd", "oc_a/../../b", "oc_a\\..\\b", "oc\x00evil", "oc_" + "a" * 62, "a" * 500,
    "$(touch /tmp/pwned)", "`id`", "oc;rm -rf /", "oc|sh", "oc&&id", "--resume=abc", "-p",
    "--dangerously-skip-permissions", "", " ", "oc_ok\n", "oc ok", "_lead", "-lead", "ＯＣ全角", "oc_é", "oc*", "oc?",
    "${HOME}", "~root", "oc_a\r\nX-Header: 1", "oc_a%2F..%2F",
)
# Texts that other layers could misread: shell, flags, paths, NULs, lone surrogates, huge.
HOSTILE_TEXTS = (
    "$(touch /tmp/pwned)", "`touch /tmp/pwned`", "; touch /tmp/pwned", "a && touch /tmp/pwned", "| sh",
    "--resume=00000000-0000-0000-0000-000000000000", "-p", "--dangerously-skip-permissions", "--help", "-", "--",
    "../../../../etc/passwd", "/etc/shadow", "nul\x00inside", "quote ' \" \\ back", "${IFS}cat${IFS}/etc/passwd",
    "line one\n--model=evil\nline three", "%s%n%x", "\u202eRTL override", "emoji 🧨 and 中文",
)

json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=10)


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, picked in proportion to its weight (`one_of` would drop repeats of one)."""
    return st.sampled_from([strategy for weight, strategy in choices for _ in range(weight)]).flatmap(lambda s: s)


def sometimes(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, sometimes any JSON value instead."""
    return weighted((3, plausible), (1, json_value))


def huge_text() -> st.SearchStrategy[str]:
    return st.builds(lambda n, piece: (piece or "x") * (n // max(1, len(piece or "x"))),
                     st.integers(20_000, 160_000), st.text(min_size=1, max_size=8))


texts = weighted((4, st.text(max_size=200)), (1, st.sampled_from(HOSTILE_TEXTS)), (1, huge_text()))
valid_chat_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", fullmatch=True)
chat_ids = weighted((6, valid_chat_ids), (1, st.sampled_from(HOSTILE_CHAT_IDS)), (1, st.text(max_size=80)))
post_element = st.fixed_dictionaries(
    {"tag": sometimes(st.sampled_from(["text", "a", "at", "md", "code_block", "img", "emotion"]))},
    optional={"text": sometimes(texts), "user_id": sometimes(st.sampled_from(["@_user_1", BOT, "all"])),
              "key": json_value})
post = st.fixed_dictionaries({"content": sometimes(st.lists(sometimes(st.lists(sometimes(post_element), max_size=4)),
                                                            max_size=4))},
                             optional={"title": sometimes(st.text(max_size=50))})
content = st.one_of(
    texts.map(lambda t: json.dumps({"text": t})),
    texts.map(lambda t: json.dumps({"text": t}, ensure_ascii=False)),
    post.map(json.dumps),
    post.map(lambda p: json.dumps({"zh_cn": p})),
    st.just('{"text": "lone \\ud83d surrogate"}'),  # valid JSON, but no valid UTF-8 once decoded
    json_value.map(json.dumps),
    json_value,
)
mention = st.fixed_dictionaries({"key": sometimes(st.sampled_from(["@_user_1", "@_user_2", ""])),
                                 "id": sometimes(st.fixed_dictionaries({"open_id": st.sampled_from([BOT, "ou_x"])}))},
                                optional={"name": sometimes(st.text(max_size=20))})
# Each field of a well-formed event, with its plausible values; `mutated` then breaks a few of them.
FIELDS: dict[tuple[str, ...], st.SearchStrategy[Any]] = {
    ("sender", "sender_id", "open_id"): st.sampled_from(["ou_u", "ou_u", BOT, ""]),
    ("sender", "sender_type"): st.sampled_from(["user", "user", "user", "app", "bot"]),
    ("message", "message_id"): weighted((4, st.uuids().map(lambda u: f"om_{u.hex}")), (1, st.text(max_size=40))),
    ("message", "chat_id"): chat_ids,
    ("message", "chat_type"): st.sampled_from(["p2p", "p2p", "group", "topic"]),
    ("message", "message_type"): st.sampled_from(["text", "text", "post", "image", "file", "sticker", "TEXT", ""]),
    ("message", "content"): content,
    ("message", "mentions"): st.lists(sometimes(mention), max_size=3),
}


MUTABLE = [*FIELDS, *FIELDS, ("sender",), ("message",), ("sender", "sender_id")]  # leaves more often


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    """A well-formed event, then up to three of its fields (or their parents) deleted or replaced with junk."""
    event: dict[str, Any] = {}
    for path, values in FIELDS.items():
        node = event
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = draw(values)
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        path = draw(st.sampled_from(MUTABLE))
        node = event
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            if draw(st.booleans()):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = draw(json_value)
    return event


events = weighted((3, mutated()), (1, json_value))


def envelopes(feishu: FakeFeishu) -> st.SearchStrategy[dict[str, Any]]:
    """Whole v2 envelopes: a real header (sometimes a wrong event type) around a malformed event, or junk."""
    def wrap(event: Any, event_type: Any, schema: Any) -> dict[str, Any]:
        envelope = feishu.text_event("oc_template", "template")
        envelope["header"]["event_type"], envelope["schema"], envelope["event"] = event_type, schema, event
        return envelope

    header_types = st.sampled_from(["im.message.receive_v1"] * 8 + ["im.message.message_read_v1", ""])
    schemas = st.sampled_from(["2.0"] * 9 + ["1.0"])
    junk = st.dictionaries(st.text(max_size=10), json_value, max_size=4)
    return weighted((9, st.builds(wrap, events, header_types, schemas)), (1, junk))
