"""Secrets are masked in every text for a chat: what is delivered and what a turn streams."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from orchestrator.channels import Outgoing, Submit
from orchestrator.config import AgentSettings, FeishuSettings, GatewaySettings, Settings
from orchestrator.masking import MASK, MaskedChannel, Masker

KEY = "sk-ant-api03-Zq9fake4f1d"


def test_every_occurrence_is_masked_and_a_longer_secret_whole() -> None:
    mask = Masker(["tok-1234", "tok-1234-and-more", ""])
    assert mask("a tok-1234-and-more b tok-1234 c") == f"a {MASK} b {MASK} c"
    assert mask("nothing secret") == "nothing secret"


def test_the_secrets_are_the_settings_secret_values() -> None:
    settings = Settings(source=Path("config.yaml"), data_dir=Path("/data"),
                        feishu=FeishuSettings(app_id="cli_x", app_secret="app-secret-1"),
                        gateway=GatewaySettings(api_key=KEY, auth_token="gw-token-1", upstream_url="http://127.0.0.1:1"),
                        agent=AgentSettings(env={"DEPLOY_TOKEN": "dt-9999", "REGION": "eu-1"}))
    mask = Masker(settings.secrets)
    assert mask(f"{KEY} app-secret-1 dt-9999 gw-token-1 http://127.0.0.1:1 eu-1") == (
        f"{MASK} {MASK} {MASK} {MASK} http://127.0.0.1:1 eu-1")


def test_streamed_text_holds_back_what_could_be_the_start_of_a_secret() -> None:
    mask = Masker([KEY])
    shown = [mask.settled(KEY[:n]) for n in range(1, len(KEY) + 1)]
    assert all(KEY[:4] not in text for text in shown)
    assert mask.settled("the key is sk-ant-ap") == "the key is "
    assert mask.settled(f"the key is {KEY}") == f"the key is {MASK}"
    assert mask.settled(f"the key is {KEY} and s") == f"the key is {MASK} and "
    assert mask.settled("plain text") == "plain text"


class Recorder:
    """A channel that keeps what it was given."""

    def __init__(self) -> None:
        self.delivered: list[Outgoing] = []
        self.updates: list[str] = []

    async def run(self, submit: Submit) -> None:
        pass

    def display(self, chat_id: str, message_id: str, saved: str | None, save: Callable[[str], None]) -> Recorder:
        return self

    async def start(self) -> None:
        pass

    async def update(self, text_so_far: str) -> None:
        self.updates.append(text_so_far)

    async def end(self) -> str | None:
        return "card-1"

    async def deliver(self, item: Outgoing) -> None:
        self.delivered.append(item)

    def health(self) -> str | None:
        return "fine"


def test_the_channel_masks_what_it_delivers_and_what_a_turn_streams() -> None:
    inner = Recorder()
    channel = MaskedChannel(inner, Masker([KEY]))

    async def use() -> str | None:
        await channel.deliver(Outgoing("oc_a", f"ran: {KEY}", "k1", "om_1", "card-1"))
        display = channel.display("oc_a", "om_1", None, lambda state: None)
        await display.start()
        for n in (3, 12, len(KEY)):
            await display.update(f"ran: {KEY[:n]}")
        return await display.end()

    assert asyncio.run(use()) == "card-1"
    assert inner.delivered == [Outgoing("oc_a", f"ran: {MASK}", "k1", "om_1", "card-1")]
    assert inner.updates == ["ran: ", "ran: ", f"ran: {MASK}"]
    assert channel.health() == "fine"
