from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from orchestrator.channels import Attachment, CardAction, Incoming
from orchestrator.channels.feishu_events import (
    FILE_NAME_CHARS,
    FORM_TEXT_CHARS,
    MAX_ATTACHMENTS,
    Ignored,
    parse_card_action,
    parse_message_event,
    post_text,
)
from orchestrator.channels.feishu_render import button_name

BOT = "ou_bot"


def event(text: str = "hello", *, chat_type: str = "p2p", message_type: str = "text", content: Any = None,
          mentions: list | None = None, sender: str = "ou_user", sender_type: str = "user",
          chat_id: Any = "oc_chat1", message_id: Any = "om_1") -> dict:
    return {
        "sender": {"sender_id": {"open_id": sender, "user_id": "u1"}, "sender_type": sender_type},
        "message": {"message_id": message_id, "chat_id": chat_id, "chat_type": chat_type,
                    "message_type": message_type,
                    "content": json.dumps({"text": text}) if content is None else content,
                    "mentions": mentions or []},
    }


def bot_mention(key: str = "@_user_1") -> dict:
    return {"key": key, "id": {"open_id": BOT}, "name": "Claude"}


def parse(e: Any, require_mention: bool = True) -> Incoming | Ignored:
    return parse_message_event(e, BOT, lambda chat_id: require_mention)


def test_p2p_text_is_answered_always() -> None:
    assert parse(event("hi there")) == Incoming("oc_chat1", "om_1", "ou_user", "hi there")


def test_group_needs_a_mention_which_is_stripped_from_the_prompt() -> None:
    assert parse(event("hi", chat_type="group")) == Ignored("a group message that does not mention the bot")
    mentioned = parse(event("@_user_1 what is 2+2", chat_type="group", mentions=[bot_mention()]))
    assert isinstance(mentioned, Incoming) and mentioned.text == "what is 2+2"


def test_group_without_require_mention() -> None:
    assert isinstance(parse(event("hi", chat_type="group"), require_mention=False), Incoming)


def test_other_peoples_mentions_become_names() -> None:
    mentions = [bot_mention(), {"key": "@_user_2", "id": {"open_id": "ou_alice"}, "name": "Alice"}]
    parsed = parse(event("@_user_1 ask @_user_2 about it", chat_type="group", mentions=mentions))
    assert isinstance(parsed, Incoming) and parsed.text == "ask @Alice about it"


def test_post_message_text() -> None:
    post = {"title": "Report", "content": [
        [{"tag": "at", "user_id": "@_user_1", "user_name": "Claude"}, {"tag": "text", "text": " summarise "},
         {"tag": "a", "text": "this link", "href": "https://x"}],
        [{"tag": "img", "image_key": "img_1"}, {"tag": "text", "text": "second line"}],
    ]}
    parsed = parse(event(message_type="post", content=json.dumps(post), chat_type="group", mentions=[bot_mention()]))
    assert isinstance(parsed, Incoming) and parsed.text == "Report\nsummarise this link\nsecond line"
    assert post_text({"zh_cn": post}) == post_text(post)


def test_unsupported_types_are_passed_on_for_a_short_reply() -> None:
    for kind, content in (("sticker", {"file_key": "file_1"}), ("merge_forward", {}), ("media", {"file_key": "f"}),
                          ("interactive", {"elements": []}), ("share_chat", {"chat_id": "oc_x"})):
        parsed = parse(event(message_type=kind, content=json.dumps(content)))
        assert parsed == Incoming("oc_chat1", "om_1", "ou_user", "", kind=kind)


def test_an_image_a_file_and_a_voice_message_are_attachments_without_text() -> None:
    def files_of(kind: str, content: dict) -> tuple[Attachment, ...]:
        parsed = parse(event(message_type=kind, content=json.dumps(content)))
        assert isinstance(parsed, Incoming) and parsed.text == "" and parsed.kind == "text"
        return parsed.attachments

    assert files_of("image", {"image_key": "img_v3_02ab-c_d"}) == (Attachment("image", "img_v3_02ab-c_d", ""),)
    assert files_of("file", {"file_key": "file_1", "file_name": "../a b.pdf"}) == \
        (Attachment("file", "file_1", "../a b.pdf"),)
    assert files_of("audio", {"file_key": "file_2", "duration": 3000}) == (Attachment("file", "file_2", "audio.opus"),)


def test_a_post_brings_its_text_and_its_images_once_each_in_order() -> None:
    post = {"zh_cn": {"title": "", "content": [
        [{"tag": "text", "text": "compare these"}], [{"tag": "img", "image_key": "img_b"}],
        [{"tag": "img", "image_key": "img_a"}, {"tag": "img", "image_key": "img_b"}],
        [{"tag": "media", "file_key": "file_m", "image_key": "img_cover"}]]}}
    parsed = parse(event(message_type="post", content=json.dumps(post)))
    assert parsed == Incoming("oc_chat1", "om_1", "ou_user", "compare these",
                              attachments=(Attachment("image", "img_b", ""), Attachment("image", "img_a", "")))
    images_only = {"content": [[{"tag": "img", "image_key": "img_c"}]]}
    only_images = parse(event(message_type="post", content=json.dumps(images_only)))
    assert isinstance(only_images, Incoming) and only_images.text == "" and len(only_images.attachments) == 1


def test_a_post_keeps_its_first_twenty_images() -> None:
    post = {"content": [[{"tag": "img", "image_key": f"img_{n}"}] for n in range(MAX_ATTACHMENTS + 5)]}
    parsed = parse(event(message_type="post", content=json.dumps(post)))
    assert isinstance(parsed, Incoming) and MAX_ATTACHMENTS == 20
    assert [a.key for a in parsed.attachments] == [f"img_{n}" for n in range(MAX_ATTACHMENTS)]


def test_a_file_name_is_bounded_and_storable_but_not_sanitised_here() -> None:
    content = {"file_key": "file_1", "file_name": "\ud83d" + "x" * 5000}
    parsed = parse(event(message_type="file", content=json.dumps(content)))
    assert isinstance(parsed, Incoming)
    name = parsed.attachments[0].name
    assert name == "?" + "x" * (FILE_NAME_CHARS - 1) and name.encode("utf-8")


@pytest.mark.parametrize(("kind", "content"), [
    ("image", {}), ("image", {"image_key": ""}), ("image", {"image_key": "../../x"}), ("image", {"image_key": 5}),
    ("image", {"image_key": "img?type=file"}), ("image", {"image_key": "k" * 201}),
    ("file", {"file_key": "file_1"}), ("file", {"file_key": "file_1", "file_name": ""}),
    ("file", {"file_key": "file_1", "file_name": ["a"]}), ("file", {"file_key": "a/b", "file_name": "a"}),
    ("audio", {"duration": 1}), ("audio", {"file_key": None}),
    ("post", {"content": [[{"tag": "text", "text": "hi"}, {"tag": "img", "image_key": "img_1/../x"}]]}),
    ("post", {"content": [[{"tag": "img"}]]}),
])
def test_malformed_files_are_ignored_with_a_reason(kind: str, content: dict) -> None:
    parsed = parse(event(message_type=kind, content=json.dumps(content)))
    assert isinstance(parsed, Ignored) and parsed.reason.startswith("malformed event"), parsed


def test_a_file_in_a_group_needs_a_mention_like_any_message() -> None:
    content = json.dumps({"image_key": "img_1"})
    assert parse(event(message_type="image", content=content, chat_type="group")) == \
        Ignored("a group message that does not mention the bot")
    assert isinstance(parse(event(message_type="image", content=content, chat_type="group"), False), Incoming)


def test_a_bare_mention_asks_for_help() -> None:
    parsed = parse(event("@_user_1", chat_type="group", mentions=[bot_mention()]))
    assert isinstance(parsed, Incoming) and parsed.text == "/help"


def test_bots_and_apps_are_ignored() -> None:
    assert parse(event(sender=BOT)) == Ignored("the bot's own message")
    assert parse(event(sender_type="app")) == Ignored("sent by app, not a user")


@pytest.mark.parametrize("bad", [
    None, [], "text", {}, {"message": {}, "sender": {}},
    event(message_id=None), event(message_id=""), event(chat_id="../../etc"), event(chat_id=None),
    event(chat_id="-rf"), event(content="not json"), event(content="[1]"), event(content=""),
])
def test_malformed_events_are_ignored_with_a_reason(bad: Any) -> None:
    parsed = parse(bad)
    assert isinstance(parsed, Ignored) and parsed.reason.startswith("malformed event")


def test_shapes_that_once_crashed_the_handler() -> None:
    lone = parse(event(content='{"text": "lone \\ud83d surrogate"}'))
    assert isinstance(lone, Incoming) and lone.text == "lone ? surrogate"
    lone.text.encode("utf-8")  # storable and sendable
    post = parse(event(message_type="post", content=json.dumps({"zh_cn": {"title": "t", "content": 5}})))
    assert isinstance(post, Incoming) and post.text == "t"
    assert isinstance(parse({**event(), "message": {**event()["message"], "mentions": True}}), Incoming)
    odd = parse(event(message_type=[[""]], content="{}"))
    assert isinstance(odd, Incoming) and odd.kind == "unknown"


# ---- card.action.trigger: clicks on approval cards ----

KEY = "0123456789abcdef0123456789abcdef"


def click(value: Any = None, *, text: Any = None, operator: Any = "ou_alice", chat_id: Any = "oc_chat1",
          message_id: Any = "om_card", tag: Any = "button") -> dict:
    action: dict[str, Any] = {"value": {"approval": KEY, "choice": "allow"} if value is None else value, "tag": tag,
                              "name": "allow"}
    if text is not None:
        action["form_value"] = {"text": text}
    return {"operator": {"open_id": operator, "user_id": "u1"}, "token": "c-token", "action": action,
            "context": {"open_message_id": message_id, "open_chat_id": chat_id}}


def test_a_button_click_is_an_action() -> None:
    assert parse_card_action(click()) == CardAction(KEY, "allow", "ou_alice", "oc_chat1", "om_card")
    denied = parse_card_action(click({"approval": KEY, "choice": "deny"}, text="not on prod"))
    assert denied == CardAction(KEY, "deny", "ou_alice", "oc_chat1", "om_card", text="not on prod")


def test_an_option_or_a_typed_answer() -> None:
    option = parse_card_action(click({"approval": KEY, "choice": "answer", "question": 1, "option": 0}, text=""))
    assert option == CardAction(KEY, "answer", "ou_alice", "oc_chat1", "om_card", question=1, option=0)
    typed = parse_card_action(click({"approval": KEY, "choice": "answer"}, text="PostgreSQL 16"))
    assert typed == CardAction(KEY, "answer", "ou_alice", "oc_chat1", "om_card", text="PostgreSQL 16")


def test_the_text_is_bounded_and_storable() -> None:
    long = parse_card_action(click(text="x" * 100_000))
    assert isinstance(long, CardAction) and len(long.text) == FORM_TEXT_CHARS
    lone = parse_card_action(click(text="lone \ud83d surrogate"))
    assert isinstance(lone, CardAction) and lone.text == "lone ? surrogate"


@pytest.mark.parametrize("bad", [
    None, [], "click", {}, click(tag="select_static"), click(tag=None),
    click({}), click({"approval": KEY}), click({"approval": KEY, "choice": "approve"}),
    click({"approval": KEY, "choice": ["allow"]}), click({"approval": None, "choice": "allow"}),
    click({"approval": "k" * 101, "choice": "allow"}), click({"approval": "../x", "choice": "allow"}),
    click({"approval": 5, "choice": "allow"}), click([KEY, "allow"]),
    click(operator=None), click(operator="all"), click(operator="ou_x y"), click(operator="ou_" + "a" * 101),
    click(chat_id=None), click(chat_id="../../etc"), click(message_id=None), click(message_id="om 1"),
    click(message_id="m" * 101),
    click(text=5), click(text={"a": 1}),
    *(click({"approval": KEY, "choice": "answer", "question": question, "option": option}) for question, option in [
        (0, None), (None, 0), (-1, 0), (0, -1), (True, 0), (0, False), (0.0, 0), ("0", "1"), (100, 0), (0, 10**9)]),
])
def test_malformed_clicks_are_ignored_with_a_reason(bad: Any) -> None:
    parsed = parse_card_action(bad)
    assert isinstance(parsed, Ignored) and parsed.reason.startswith("malformed card action"), parsed


def test_a_forged_shape_in_every_field_never_raises() -> None:
    for field in ("operator", "action", "context"):
        for junk in (None, 5, "x", [], [{}], {"open_id": {"x": 1}}):
            assert isinstance(parse_card_action({**click(), field: junk}), Ignored)
    assert isinstance(parse_card_action(click({"approval": KEY, "choice": "allow", "question": [1] * 10})), CardAction)


def test_a_click_without_its_value_is_read_from_its_buttons_name() -> None:
    key = "0123456789abcdef0123456789abcdef"
    event = {"operator": {"open_id": "ou_alice"}, "context": {"open_chat_id": "oc_chat", "open_message_id": "om_card"},
             "action": {"tag": "button", "name": button_name(key, "answer", 1, 2), "form_value": {"text": ""}}}
    parsed = parse_card_action(event)
    assert isinstance(parsed, CardAction) and (parsed.key, parsed.choice, parsed.question, parsed.option) == (
        key, "answer", 1, 2)
    event["action"]["name"] = button_name(key, "deny")
    assert parse_card_action(event) == CardAction(key, "deny", "ou_alice", "oc_chat", "om_card")
    event["action"]["name"] = "something-else"
    assert isinstance(parse_card_action(event), Ignored)


def test_a_message_in_a_topic_carries_its_thread_id_when_it_has_the_shape_of_one() -> None:
    raw = event("in a topic")
    raw["message"]["thread_id"] = "omt_1a2b3c"  # a topic's new message: thread_id set, root_id may be empty
    parsed = parse_message_event(raw, BOT, lambda chat_id: True)
    assert isinstance(parsed, Incoming) and parsed.thread_id == "omt_1a2b3c"
    for forged in ("../../x", "omt_" + "a" * 500, 7, None, "om_notathread"):
        raw["message"]["thread_id"] = forged
        parsed = parse_message_event(raw, BOT, lambda chat_id: True)
        assert isinstance(parsed, Incoming) and parsed.thread_id == ""


# ---- events with fields missing ----


def test_a_message_without_a_sender_or_a_sender_without_a_message_is_ignored_with_a_reason() -> None:
    message = event()["message"]
    for sender in (None, "ou_user", [], 5):
        assert parse({"message": message, "sender": sender}) == Ignored("malformed event: no sender")
    assert parse({"message": message}) == Ignored("malformed event: no sender")
    assert parse({"sender": event()["sender"]}) == Ignored("malformed event: no message")
    assert parse({"sender": event()["sender"], "message": "text"}) == Ignored("malformed event: no message")


@pytest.mark.parametrize("sender_id", [
    "missing", None, "ou_x", {"user_id": "u1"}, {"open_id": ""}, {"open_id": 7}, {"open_id": ["ou_x"]},
    {"open_id": "ou_a b"}, {"open_id": "u1"}, {"open_id": "ou_" + "a" * 101},
])
def test_a_users_message_without_an_open_id_is_ignored(sender_id: object) -> None:
    """allowed_users, approvers and per-user budgets all go by the sender's open id: one without it is not served."""
    sender = {"sender_type": "user"} if sender_id == "missing" else {"sender_type": "user", "sender_id": sender_id}
    parsed = parse({**event(), "sender": sender})
    assert isinstance(parsed, Ignored) and parsed.reason.startswith("malformed event: sender open_id"), parsed


def test_a_sender_of_no_or_another_type_is_not_a_user() -> None:
    assert parse({**event(), "sender": {"sender_id": {"open_id": "ou_user"}}}) == \
        Ignored("sent by an unknown sender, not a user")
    forged = parse(event(sender_type="x" * 10_000))
    assert isinstance(forged, Ignored) and len(forged.reason) < 120


def test_a_message_without_a_chat_type_needs_a_mention_as_a_group_message_does() -> None:
    raw = event("hi")
    del raw["message"]["chat_type"]
    assert parse(raw) == Ignored("a group message that does not mention the bot")
    assert isinstance(parse(raw, require_mention=False), Incoming)


def test_a_message_without_a_type_mentions_or_text_is_still_read() -> None:
    raw = event()
    del raw["message"]["message_type"], raw["message"]["mentions"]
    assert parse(raw) == Incoming("oc_chat1", "om_1", "ou_user", "", kind="unknown")
    for forged in ("", "../../x", "text; rm", 5):  # the kind is named in a reply and a log line
        assert parse(event(message_type=forged)) == Incoming("oc_chat1", "om_1", "ou_user", "", kind="unknown")
    assert parse(event(content="{}")) == Incoming("oc_chat1", "om_1", "ou_user", "/help")  # text without text
    raw = event()
    del raw["message"]["content"]
    assert parse(raw) == Ignored("malformed event: text content is not JSON")


def test_mentions_of_the_wrong_shape_mention_nobody() -> None:
    broken = [{"key": "@_user_1"}, {"key": "@_user_1", "id": BOT}, {"key": "@_user_1", "id": {"open_id": [BOT]}}, "x"]
    assert parse(event("@_user_1 hi", chat_type="group", mentions=broken)) == \
        Ignored("a group message that does not mention the bot")
    parsed = parse(event("@_user_1 hi", mentions=broken))
    assert isinstance(parsed, Incoming) and parsed.text == "@someone hi"


def test_before_the_bot_knows_its_own_open_id_no_mention_is_the_bots() -> None:
    unknown_bot = {"key": "@_user_1", "id": {"open_id": ""}, "name": "Claude"}
    parsed = parse_message_event(event("@_user_1 hi", chat_type="group", mentions=[unknown_bot]), "", lambda c: True)
    assert parsed == Ignored("a group message that does not mention the bot")
    assert isinstance(parse_message_event(event("hi"), "", lambda c: True), Incoming)


# ---- what a mutation run found unpinned (issue 15) ----


def test_a_post_reads_mentions_markdown_and_code_like_text() -> None:
    post = {"content": [
        [{"tag": "text", "text": "ask "}, {"tag": "at", "user_id": "@_user_2", "user_name": "Alice"},
         {"tag": "text", "text": " and "}, {"tag": "at", "key": "@_user_3"}, {"tag": "at"}, {"tag": "text"}],
        [{"tag": "md", "text": "**bold**"}], [{"tag": "code_block", "language": "PYTHON", "text": "print(1)"}]]}
    mentions = [{"key": "@_user_2", "id": {"open_id": "ou_alice"}, "name": "Alice"},
                {"key": "@_user_3", "id": {"open_id": "ou_bob"}, "name": "Bob"}]
    parsed = parse(event(message_type="post", content=json.dumps(post), mentions=mentions))
    assert isinstance(parsed, Incoming) and parsed.text == "ask @Alice and @Bob\n**bold**\nprint(1)"


def test_a_post_wrapped_in_a_language_key_around_no_object_is_empty() -> None:
    for inner in ("hello", ["x"], 5):
        parsed = parse(event(message_type="post", content=json.dumps({"zh_cn": inner})))
        assert parsed == Incoming("oc_chat1", "om_1", "ou_user", "/help")


def test_require_mention_is_asked_for_the_chat_of_the_message() -> None:
    def quiet(chat_id: str) -> bool:
        return chat_id == "oc_quiet"

    assert isinstance(parse_message_event(event("hi", chat_type="group"), BOT, quiet), Incoming)
    assert parse_message_event(event("hi", chat_type="group", chat_id="oc_quiet"), BOT, quiet) == \
        Ignored("a group message that does not mention the bot")


def test_an_unsupported_message_in_a_topic_is_answered_in_the_topic() -> None:
    raw = event(message_type="sticker", content=json.dumps({"file_key": "file_1"}))
    raw["message"]["thread_id"] = "omt_1"
    assert parse(raw) == Incoming("oc_chat1", "om_1", "ou_user", "", kind="sticker", thread_id="omt_1")


def test_the_space_a_dropped_mention_leaves_is_one_space() -> None:
    parsed = parse(event("please @_user_1  help", chat_type="group", mentions=[bot_mention()]))
    assert isinstance(parsed, Incoming) and parsed.text == "please help"


def test_a_mention_without_a_key_changes_nothing_and_the_next_is_still_read() -> None:
    mentions = [{"key": "", "name": "Nobody"}, {"key": 5}, {"name": "Keyless"}, bot_mention()]
    parsed = parse(event("@_user_1 hi there", chat_type="group", mentions=mentions))
    assert isinstance(parsed, Incoming) and parsed.text == "hi there"


def test_the_highest_option_index_is_taken() -> None:
    parsed = parse_card_action(click({"approval": KEY, "choice": "answer", "question": 99, "option": 99}))
    assert isinstance(parsed, CardAction) and (parsed.question, parsed.option) == (99, 99)


LONG = "../" + "x" * 200
POST_IMAGE = {"content": [[{"tag": "img", "image_key": "img/../x"}]]}


@pytest.mark.parametrize(("parser", "raw", "reason"), [
    (parse_card_action, click(tag="select_static"), "malformed card action: not a button ('select_static')"),
    (parse_card_action, click(tag={"x": 1}), "malformed card action: not a button ('dict')"),
    (parse_card_action, click({"approval": "../x", "choice": "allow"}),
     "malformed card action: no approval key ('../x')"),
    (parse_card_action, click({"approval": KEY, "choice": "approve"}),
     "malformed card action: choice 'approve' is not one of allow, always, deny, answer"),
    (parse_card_action, click(operator="all"), "malformed card action: operator 'all' is not an open id"),
    (parse_card_action, click(operator=LONG), f"malformed card action: operator {repr(LONG)[:80]} is not an open id"),
    (parse_card_action, click(chat_id="../x"), "malformed card action: chat '../x' or message 'om_card' not valid"),
    (parse_card_action, click(message_id="om 1"), "malformed card action: chat 'oc_chat1' or message 'om 1' not valid"),
    (parse, event(chat_id=LONG), f"malformed event: chat_id {LONG[:80]!r} is not valid"),
    (parse, event(sender_type=LONG), f"sent by {LONG[:80]}, not a user"),
    (parse, {**event(), "sender": {"sender_type": "user", "sender_id": {"open_id": "u1"}}},
     "malformed event: sender open_id 'u1' is not valid"),
    (parse, event(message_type="post", content=json.dumps(POST_IMAGE)),
     "malformed event: image key 'img/../x' is not valid"),
    (parse, event(message_type="image", content=json.dumps({"image_key": "../x"})),
     "malformed event: image key '../x' is not valid"),
    (parse, event(message_type="file", content=json.dumps({"file_key": "file_1", "file_name": ["a"]})),
     "malformed event: file name 'list' is not valid"),
])
def test_a_reason_names_the_bad_value_shortly_for_the_log(parser: Callable[[Any], object], raw: dict,
                                                          reason: str) -> None:
    assert parser(raw) == Ignored(reason)
