"""The webhook as an attacker meets it (issue 9): the real orchestrator in webhook mode, its real lark-oapi
dispatcher, events signed and encrypted as Feishu does it (tests/fakes/feishu.py), and the attack clients of
the fault suite (bench/faults_lib/webhook.py) on raw sockets. Real events come from 127.0.0.2 (as from
Feishu), attacks from 127.1.x.y (a fresh address each) or, against the per-client cap, all from 127.0.0.1."""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from bench.faults_lib.webhook import (
    ACK_LIMIT,
    ENCRYPT_KEY,
    EXPECTED,
    FLOOD_BYTES,
    RSS_BOUND,
    THREAD_BOUND,
    Attacker,
    ProcessPeaks,
    exchange,
    raw_request,
    webhook_config,
)
from orchestrator.channels.feishu_webhook import WebhookLimits
from tests.fakes.feishu import FakeFeishu, encrypt_body, url_verification, webhook_request
from tests.harness import Orchestrator, StoreView, answers, chat, free_port, wait_answer, wait_until

READ_TIMEOUT = 3.0
HEAD_TIMEOUT = WebhookLimits.head_timeout  # the server's own, for the request line and headers
SLOW_CLIENTS = 50
PER_CLIENT = 8  # feishu.webhook_max_per_client's default
FLOODS = 4  # each claims and streams 64 MiB: 256 MiB, which would not fit under RSS_BOUND if it were read


def start_webhook(feishu_config, **overrides) -> tuple[Orchestrator, int]:
    port = free_port()
    bot = Orchestrator(feishu_config(webhook_config(port, **{"webhook_timeout": READ_TIMEOUT, **overrides})))
    bot.wait_log("listening for Feishu events", timeout=120)
    return bot, port


def test_attacks_are_refused_while_real_events_are_acked_and_answered(feishu: FakeFeishu, feishu_config,
                                                                      store_view: StoreView) -> None:
    bot, port = start_webhook(feishu_config)
    attacker = Attacker(port, feishu, victim=chat())
    chat_id = chat()
    try:
        warm_up = feishu.text_event(chat_id, "warm up")
        assert attacker.post(warm_up)[1].status == 200
        wait_answer(feishu, chat_id, "Fake answer to: warm up")  # the container and the service's pools exist
        attacks = [kind for kind in EXPECTED if kind not in ("slowloris", "replayed", "flood")]
        with ProcessPeaks(bot.process.pid) as peaks, ThreadPoolExecutor(SLOW_CLIENTS + 20) as pool:
            slow = [pool.submit(attacker.send, "slowloris") for _ in range(SLOW_CLIENTS)]
            floods = [pool.submit(attacker.send, "flood") for _ in range(FLOODS)]
            time.sleep(0.5)  # the slow clients are connected and trickling
            real = []
            for n in range(3):
                others = [pool.submit(attacker.send, kind) for kind in attacks]
                event = feishu.text_event(chat_id, f"real event {n}")
                request, answer = attacker.post(event)
                assert (answer.status, json.loads(answer.body)) == (200, {"msg": "success"})
                assert answer.seconds < ACK_LIMIT, f"acked after {answer.seconds:.2f} s"
                real.append((event, request))
                for future in others:
                    future.result()
            assert not any(future.done() for future in slow), "the slow clients were cut off too early to matter"
            for _, request in real:
                assert attacker.replay(request).status == 401
            for future in [*slow, *floods]:
                future.result()
        print(f"\n{peaks.report()}; slow clients cut off after "
              f"{max(a.seconds for a in attacker.outcomes['slowloris']):.1f} s")

        for kind, outcomes in attacker.outcomes.items():
            wrong = [a for a in outcomes if not attacker.refused(kind, a, READ_TIMEOUT)]
            assert not wrong, f"{kind}: {wrong[:3]}"
        assert len(attacker.outcomes["slowloris"]) == SLOW_CLIENTS
        assert all(a.sent < FLOOD_BYTES // 4 for a in attacker.outcomes["flood"])
        refusals = {a.body for kind in ("forged", "unsigned", "stale", "bad padding", "replayed")
                    for a in attacker.outcomes[kind]}
        assert refusals == {b'{"msg":"refused"}'}  # a bad signature and a bad padding look the same

        for event, _ in real:
            text = json.loads(event["event"]["message"]["content"])["text"]
            wait_answer(feishu, chat_id, f"Fake answer to: {text}")
        wait_until(lambda: [m["state"] for m in store_view.messages(chat_id)] == ["delivered"] * 4, 60, "delivered")
        assert len(answers(feishu, chat_id)) == 4  # each answered once, replays included
        assert store_view.messages(attacker.victim) == [] and feishu.messages(attacker.victim) == []
        assert peaks.peak_threads <= THREAD_BOUND, peaks.report()  # a thread per connection: over 50
        assert peaks.peak_rss < RSS_BOUND, peaks.report()
        assert "webhook request refused: bad signature" in bot.log()
        assert "webhook request refused: replayed" in bot.log()
    finally:
        bot.stop()


def test_url_verification_comes_unsigned_and_must_carry_the_token(feishu: FakeFeishu, feishu_config) -> None:
    """Feishu sends its URL check without X-Lark-* headers, even with an Encrypt Key."""
    bot, port = start_webhook(feishu_config)
    try:
        def challenge(token: str, encrypted: bool = True, signed: bool = False) -> tuple[int, bytes]:
            body = url_verification("challenge-123", token)
            if signed:
                raw = raw_request(*webhook_request(body, ENCRYPT_KEY))
            else:
                raw = raw_request(json.dumps(encrypt_body(body, ENCRYPT_KEY) if encrypted else body).encode(), {})
            answer = exchange(port, raw)
            return answer.status, answer.body

        assert challenge(feishu.verification_token) == (200, b'{"challenge": "challenge-123"}')
        assert json.loads(challenge(feishu.verification_token, signed=True)[1]) == {"challenge": "challenge-123"}
        assert challenge("not-the-token") == (401, b'{"msg":"refused"}')
        assert challenge(feishu.verification_token, encrypted=False) == (401, b'{"msg":"refused"}')
    finally:
        bot.stop()


def test_connections_over_the_limit_are_answered_503_at_once(feishu: FakeFeishu, feishu_config) -> None:
    bot, port = start_webhook(feishu_config, webhook_max_concurrent=4)
    attacker = Attacker(port, feishu, victim=chat())
    chat_id = chat()
    try:
        with ThreadPoolExecutor(4) as pool:
            slow = [pool.submit(attacker.send, "slowloris") for _ in range(4)]
            time.sleep(0.5)
            busy = attacker.post(feishu.text_event(chat_id, "while it is full"))[1]
            assert (busy.status, busy.body) == (503, b'{"msg":"busy"}')
            assert busy.seconds < ACK_LIMIT, "refused at once, not after the slow clients"
            assert not any(future.done() for future in slow)
        assert attacker.post(feishu.text_event(chat_id, "once there is room"))[1].status == 200
        wait_answer(feishu, chat_id, "Fake answer to: once there is room")
        assert answers(feishu, chat_id) == ["Fake answer to: once there is room"]
        assert "more than 4 connections at once" in bot.log()
    finally:
        bot.stop()


def test_one_address_cannot_crowd_out_feishu(feishu: FakeFeishu, feishu_config) -> None:
    """The security review's PoC: more idle connections than webhook_max_concurrent, all from one client, made
    every genuine event get 503. Now that client holds 8 (the rest get 503 at once), each only until its
    headers are due (3 s, though webhook_timeout is 10), and Feishu's event from another address is acked."""
    bot, port = start_webhook(feishu_config, webhook_timeout=10)
    attacker = Attacker(port, feishu, victim=chat(), source="127.0.0.1")
    chat_id = chat()
    holders = 72  # over webhook_max_concurrent (64)
    try:
        with ThreadPoolExecutor(holders) as pool:
            slow = [pool.submit(attacker.send, "slowloris") for _ in range(holders)]
            wait_until(lambda: [a.status for a in attacker.outcomes["slowloris"]].count(503) == holders - PER_CLIENT,
                       30, "all but 8 refused at once")
            answer = attacker.post(feishu.text_event(chat_id, "while one address holds its 8"))[1]
            assert (answer.status, json.loads(answer.body)) == (200, {"msg": "success"})
            assert answer.seconds < ACK_LIMIT, f"acked after {answer.seconds:.2f} s"
            genuine = raw_request(*webhook_request(feishu.text_event(chat_id, "from the crowding address"),
                                                   ENCRYPT_KEY))
            busy = exchange(port, genuine, source="127.0.0.1")
            assert (busy.status, busy.body) == (503, b'{"msg":"busy"}')  # refused unread, signed or not
            assert sum(not f.done() for f in slow) == PER_CLIENT, "the address's 8 were cut off too early to matter"
        statuses = Counter(a.status for a in attacker.outcomes["slowloris"])
        assert statuses == {408: PER_CLIENT, 503: holders - PER_CLIENT}, statuses
        held = [a.seconds for a in attacker.outcomes["slowloris"] if a.status == 408]
        assert max(held) < 10, f"cut off after {max(held):.1f} s: the header deadline did not apply"
        wait_answer(feishu, chat_id, "Fake answer to: while one address holds its 8")
        assert answers(feishu, chat_id) == ["Fake answer to: while one address holds its 8"]
        assert f"more than {PER_CLIENT} connections at once from 127.0.0.1" in bot.log()
        assert f"request line and headers not sent within {HEAD_TIMEOUT:g} s" in bot.log()
    finally:
        bot.stop()
