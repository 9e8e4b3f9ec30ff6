"""The webhook's signature, timestamp window and replay checks (orchestrator/channels/feishu_webhook.py),
against signatures made the way Feishu makes them (tests/fakes/feishu.py), and what counts as one client for
its per-client connection cap. The server around them is tested end to end in
tests/acceptance/test_webhook_security.py."""

from __future__ import annotations

import pytest

from orchestrator.channels.feishu_webhook import SIGNATURE, Refused, Verifier, client_of
from tests.fakes.feishu import signature_headers

KEY = "encrypt-key"
NOW = 1_700_000_000.0
BODY = b'{"encrypt":"..."}'


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def signed(timestamp: float = NOW, body: bytes = BODY, key: str = KEY) -> dict[str, str]:
    return signature_headers(body, key, timestamp=str(int(timestamp)))


def refusal(verifier: Verifier, headers: dict[str, str], body: bytes = BODY) -> str:
    with pytest.raises(Refused) as refused:
        verifier.check(headers, body)
    return str(refused.value)


def test_a_signed_recent_request_passes_once() -> None:
    verifier = Verifier(KEY, clock=Clock())
    headers = signed()
    verifier.check(headers, BODY)
    assert refusal(verifier, headers) == "replayed (a signature already seen)"


@pytest.mark.parametrize("tamper", ["body", "key", "signature", "missing", "upper-case"])
def test_a_bad_signature_is_refused(tamper: str) -> None:
    headers = signed(key="other-key" if tamper == "key" else KEY)
    body = BODY + b" " if tamper == "body" else BODY
    if tamper == "signature":
        headers[SIGNATURE] = "0" * 64
    elif tamper == "missing":
        del headers[SIGNATURE]
    elif tamper == "upper-case":
        headers[SIGNATURE] = headers[SIGNATURE].upper()
    assert refusal(Verifier(KEY, clock=Clock()), headers, body) == "bad signature"


@pytest.mark.parametrize("offset", [-301, 301, -86400])
def test_a_signed_request_outside_the_window_is_refused(offset: int) -> None:
    verifier = Verifier(KEY, window=300, clock=Clock())
    assert refusal(verifier, signed(NOW + offset)) == "timestamp outside the replay window"
    verifier.check(signed(NOW - 299), BODY)


def test_a_timestamp_that_is_not_plain_digits_is_refused_even_if_signed() -> None:
    headers = signature_headers(BODY, KEY, timestamp=f" {int(NOW)}")
    assert refusal(Verifier(KEY, clock=Clock()), headers) == "timestamp outside the replay window"


def test_a_request_the_service_did_not_take_may_come_again() -> None:
    verifier = Verifier(KEY, clock=Clock())
    headers = signed()
    verifier.check(headers, BODY)
    verifier.forget(headers[SIGNATURE])
    verifier.check(headers, BODY)


def test_signatures_are_forgotten_after_the_window_and_capped_within_it() -> None:
    clock = Clock()
    verifier = Verifier(KEY, window=300, capacity=3, clock=clock)
    for n in range(3):
        verifier.check(signed(NOW + n), BODY)
    assert refusal(verifier, signed(NOW + 3)) == "more than 3 signed requests within the replay window"
    clock.now = NOW + 301  # the first one's timestamp is out of the window: it cannot be replayed anyway
    verifier.check(signed(NOW + 290), BODY)


@pytest.mark.parametrize(("host", "client"), [
    ("203.0.113.7", "203.0.113.7"),
    ("::ffff:203.0.113.7", "203.0.113.7"),  # an IPv4 client of a dual-stack socket counts as itself
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # another address of the same host's /64
    ("?", "?"),
])
def test_a_client_is_an_ipv4_address_or_an_ipv6_64(host: str, client: str) -> None:
    assert client_of(host) == client
