"""Approvals in Feishu cards (issue 12), end to end: the real orchestrator, the real CLI in the chat's container
asking through its permission prompt tool, the real lark-oapi client taking the fake Feishu's card callbacks over
the long connection and the webhook, and the real store."""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from pathlib import Path

from bench.faults_lib.webhook import ENCRYPT_KEY, Attacker, webhook_config
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.feishu import BotMessage, CallbackAnswer, FakeFeishu, Webhook
from tests.harness import Orchestrator, answers, chat, free_port, run_cli, wait_answer, wait_until

SENDER, APPROVER, OTHER_APPROVER, STRANGER = "ou_user", "ou_approver", "ou_second", "ou_stranger"
MODE = {"permission_mode": "default", "approvers": [APPROVER, OTHER_APPROVER]}


def approval_config(feishu_config, feishu_overrides: dict | None = None, metrics_port: int | None = None,
                    **group: object) -> Path:
    extra = {"metrics": {"listen": f"127.0.0.1:{metrics_port}"}} if metrics_port else {}
    return feishu_config(feishu_overrides, defaults={**MODE, **group}, **extra)


def approvals_counted(port: int) -> dict[str, float]:
    """orchestrator_approvals_total by outcome, from /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {outcome: float(count)
            for outcome, count in re.findall(r'^orchestrator_approvals_total\{outcome="(\w+)"\} (\S+)$', text, re.M)}


def approval_cards(feishu: FakeFeishu, chat_id: str) -> list[BotMessage]:
    """The approval cards in the chat (cards sent as messages; the answers' cards are CardKit entities)."""
    return [m for m in feishu.messages(chat_id) if m.msg_type == "interactive" and m.card_id is None]


def wait_card(feishu: FakeFeishu, chat_id: str, count: int = 1) -> str:
    """The message id of the chat's `count`-th approval card, once it shows its buttons."""
    def ready() -> str | None:
        cards = approval_cards(feishu, chat_id)
        return cards[count - 1].message_id if len(cards) >= count and feishu.buttons(cards[count - 1].message_id) \
            else None

    return wait_until(ready, 90, f"approval card {count} in {chat_id}; the chat shows {answers(feishu, chat_id)}")


def card_text(feishu: FakeFeishu, message_id: str) -> str:
    return feishu.message(message_id).text


def workspace(tmp_path: Path, chat_id: str) -> Path:
    return tmp_path / "data" / "chats" / chat_id / "workspace"


def clicked(answer: CallbackAnswer) -> str:
    assert answer.failure is None, answer.failure
    assert answer.toast is not None
    return answer.toast.content


def test_deny_allow_always_strangers_and_two_approvers_at_once(feishu: FakeFeishu, feishu_config, start,
                                                               fake_api: FakeAnthropic, tmp_path: Path) -> None:
    metrics_port = free_port()
    start(approval_config(feishu_config, metrics_port=metrics_port))
    chat_id = chat()
    files = workspace(tmp_path, chat_id)

    feishu.push_event(feishu.text_event(chat_id, "RUN_BASH: touch /workspace/denied"))
    card = wait_card(feishu, chat_id)
    shown = card_text(feishu, card)
    assert "touch /workspace/denied" in shown and "Bash" in shown
    wait_answer(feishu, chat_id, "Waiting for approval: Bash", timeout=10)  # the answer's card says so
    assert "approvers can decide" in clicked(feishu.click(card, "Allow once", STRANGER))
    assert feishu.buttons(card)  # a stranger's click changed nothing
    toast = clicked(feishu.click(card, "Deny", SENDER, form_value={"text": "not this one"}))
    assert toast == "Denied: not this one."
    wait_answer(feishu, chat_id, "ran: Denied by an approver in the chat: not this one")
    assert not (files / "denied").exists()
    assert feishu.buttons(card) == [] and "Denied" in card_text(feishu, card)

    feishu.push_event(feishu.text_event(chat_id, "RUN_BASH: touch /workspace/allowed && echo made"))
    card = wait_card(feishu, chat_id, 2)
    assert clicked(feishu.click(card, "Allow once", APPROVER, frame_type="event")) == "Allowed once."
    wait_answer(feishu, chat_id, "ran: made")
    assert (files / "allowed").exists()

    # Two approvers at once: one decision, and the other is told it is settled.
    feishu.push_event(feishu.text_event(chat_id, "RUN_BASH: touch /workspace/raced && echo raced"))
    card = wait_card(feishu, chat_id, 3)
    toasts: list[str] = []
    clickers = [threading.Thread(target=lambda who=who, choice=choice: toasts.append(
        clicked(feishu.click(card, choice, who)))) for who, choice in ((APPROVER, "Allow once"),
                                                                     (OTHER_APPROVER, "Deny"))]
    for clicker in clickers:
        clicker.start()
    for clicker in clickers:
        clicker.join(10)
    assert len(toasts) == 2 and sum(t.startswith("Already settled") for t in toasts) == 1, toasts
    won = next(t for t in toasts if not t.startswith("Already settled"))
    wait_answer(feishu, chat_id, "ran: raced" if won == "Allowed once." else "ran: Denied by an approver in the chat.")
    assert (files / "raced").exists() == (won == "Allowed once.")

    # Always allow: the next Bash call is not asked, until /permissions reset.
    feishu.push_event(feishu.text_event(chat_id, "RUN_BASH: touch /workspace/always1 && echo one"))
    card = wait_card(feishu, chat_id, 4)
    assert "listed approvers" in clicked(feishu.click(card, "Always allow Bash here", SENDER))  # binds others too
    assert clicked(feishu.click(card, "Always allow Bash here", APPROVER)) == "Always allowed in this chat: Bash."
    wait_answer(feishu, chat_id, "ran: one")
    feishu.push_event(feishu.text_event(chat_id, "RUN_BASH: touch /workspace/always2 && echo two"))
    wait_answer(feishu, chat_id, "ran: two")
    assert (files / "always2").exists() and len(approval_cards(feishu, chat_id)) == 4
    feishu.push_event(feishu.text_event(chat_id, "/status"))
    wait_answer(feishu, chat_id, "always allowed here: Bash")
    feishu.push_event(feishu.text_event(chat_id, "/permissions reset"))
    wait_answer(feishu, chat_id, "Forgot 1 tool(s) allowed for good")
    feishu.push_event(feishu.text_event(chat_id, "RUN_BASH: touch /workspace/again"))
    wait_card(feishu, chat_id, 5)

    log = run_cli(tmp_path / "config.yaml", "logs", chat_id, "-n", "50").stdout
    assert "approval" in log and "denied by ou_user" in log and "always allowed by ou_approver" in log
    counted = approvals_counted(metrics_port)  # 6 asked (the always-allowed call too), 5 decided, the last waits
    assert counted["asked"] == 6 and counted["denied"] + counted["allowed"] == 5, counted


def test_the_timeout_denies_and_the_chat_is_told(feishu: FakeFeishu, feishu_config, start,
                                                 fake_api: FakeAnthropic, tmp_path: Path) -> None:
    metrics_port = free_port()
    start(approval_config(feishu_config, metrics_port=metrics_port, approval_timeout=3))
    chat_id = chat()
    feishu.push_event(feishu.text_event(chat_id, "RUN_BASH: touch /workspace/late"))
    card = wait_card(feishu, chat_id)
    wait_answer(feishu, chat_id, "ran: Denied: nobody decided within 3 seconds")
    wait_until(lambda: feishu.buttons(card) == [], 30, "the card's buttons gone")
    assert "Timed out" in card_text(feishu, card)
    assert not (workspace(tmp_path, chat_id) / "late").exists()
    assert approvals_counted(metrics_port)["timed_out"] == 1


def test_kill_9_while_a_card_waits_then_the_button_still_works(feishu: FakeFeishu, feishu_config, start,
                                                                fake_api: FakeAnthropic, tmp_path: Path) -> None:
    config = approval_config(feishu_config)
    bot = start(config)
    chat_id = chat()
    feishu.push_event(feishu.text_event(chat_id, "RUN_BASH: touch /workspace/survived && echo survived"))
    card = wait_card(feishu, chat_id)
    bot.kill()
    start(config, connections=2)
    assert clicked(feishu.click(card, "Allow once", SENDER)) == "Allowed once."
    wait_answer(feishu, chat_id, "ran: survived")
    assert (workspace(tmp_path, chat_id) / "survived").exists()
    assert sum("ran: survived" in text for text in answers(feishu, chat_id)) == 1
    assert len(approval_cards(feishu, chat_id)) == 1  # the restart sent no second card


def test_ask_user_question_is_answered_by_a_button(feishu: FakeFeishu, feishu_config, start,
                                                   fake_api: FakeAnthropic) -> None:
    start(approval_config(feishu_config))
    chat_id = chat()
    feishu.push_event(feishu.text_event(chat_id, "ASK_USER: Which colour? | red | blue"))
    card = wait_card(feishu, chat_id)
    assert "Which colour?" in card_text(feishu, card)
    assert clicked(feishu.click(card, "blue", SENDER)) == "Answered: blue."
    wait_answer(feishu, chat_id, "answered:")
    final = next(text for text in answers(feishu, chat_id) if "answered:" in text)
    assert '"Which colour?"="blue"' in final  # what the CLI tells the model about the answer


def test_forged_replayed_and_unknown_callbacks_change_nothing(feishu: FakeFeishu, feishu_config,
                                                              fake_api: FakeAnthropic, tmp_path: Path) -> None:
    port = free_port()
    bot = Orchestrator(approval_config(feishu_config, webhook_config(port)))
    try:
        bot.wait_log("listening for Feishu events", timeout=120)
        hook = Webhook(f"http://127.0.0.1:{port}/feishu/events", ENCRYPT_KEY)
        chat_id = chat()
        Attacker(port, feishu, victim=chat_id).post(feishu.text_event(chat_id, "RUN_BASH: touch /workspace/x; echo x"))
        card = wait_card(feishu, chat_id)
        envelope = feishu.card_action_event(card, "Allow once", SENDER)
        forged = feishu.send_callback(envelope, via="webhook", webhook=hook, signature="0" * 64)
        assert forged.status == 401
        unknown = json.loads(json.dumps(envelope))
        unknown["event"]["action"]["value"]["approval"] = "f" * 32
        assert clicked(feishu.send_callback(unknown, via="webhook", webhook=hook)) == \
            "This card is not known to the bot."
        assert feishu.buttons(card)
        genuine = feishu.click(card, "Allow once", SENDER, via="webhook", webhook=hook)
        assert clicked(genuine) == "Allowed once."
        assert feishu.replay(genuine).status == 401  # the signature was seen: a replay is refused
        wait_answer(feishu, chat_id, "ran: x")
        assert sum("ran: x" in text for text in answers(feishu, chat_id)) == 1
    finally:
        bot.stop()


def test_a_planned_shutdown_denies_what_waits_and_tells_the_chat(feishu: FakeFeishu, feishu_config, start,
                                                                 fake_api: FakeAnthropic, tmp_path: Path) -> None:
    bot = start(approval_config(feishu_config))
    chat_id = chat()
    feishu.push_event(feishu.text_event(chat_id, "RUN_BASH: touch /workspace/never"))
    card = wait_card(feishu, chat_id)
    assert bot.stop() == 0
    assert "Denied: the bot is restarting" in card_text(feishu, card) and feishu.buttons(card) == []
    wait_answer(feishu, chat_id, "ran: Denied: the bot is restarting", timeout=5)
    assert not (workspace(tmp_path, chat_id) / "never").exists()
