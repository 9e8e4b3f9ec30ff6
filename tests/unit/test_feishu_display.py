"""The streaming answer card (orchestrator/channels/feishu.FeishuDisplay): throttled, and never left behind the turn's
latest text. The channel is a fake of our own seam (its card calls); the real one is tested against the fake Feishu
in the acceptance tests."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.channels import feishu
from orchestrator.channels.feishu import FeishuDisplay


class SlowCards:
    """The channel's card calls, the first creation held until released (a slow Feishu)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.created: list[str] = []
        self.streamed: list[str] = []

    async def create_card(self, chat_id: str, text: str) -> str:
        self.created.append(text)
        await self.release.wait()
        return "card_1"

    async def send_card(self, chat_id: str, card_id: str, reply_to: str, uuid: str) -> None:
        pass

    async def stream_card(self, chat_id: str, card_id: str, text: str) -> None:
        self.streamed.append(text)


def test_text_that_comes_while_the_card_is_pushed_is_pushed_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A turn that starts waiting for approval updates the card once (the note), maybe while its first text is
    still being pushed, and never again while it waits: the note must reach the card all the same (a CI run saw the
    card keep the first text)."""
    monkeypatch.setattr(feishu, "CARD_UPDATE_INTERVAL", 0.05)

    async def scenario() -> SlowCards:
        cards = SlowCards()
        display = FeishuDisplay(cards, "oc_a", "om_1", {}, lambda saved: None)  # type: ignore[arg-type]
        await display.update("Running it now.")
        while not cards.created:
            await asyncio.sleep(0)
        await display.update("Running it now.\n\nWaiting for approval: Bash")  # during the card's creation
        cards.release.set()
        for _ in range(100):
            if cards.streamed:
                break
            await asyncio.sleep(0.01)
        return cards

    cards = asyncio.run(scenario())
    assert cards.created == ["Running it now."]
    assert cards.streamed == ["Running it now.\n\nWaiting for approval: Bash"]
