"""Secrets are masked in every text for a chat: what is delivered, what a turn streams, and approval cards."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import masking
from orchestrator.channels import (
    Act,
    ActionReply,
    ApprovalView,
    CardAction,
    DeliveryFailed,
    OutFile,
    Outgoing,
    Question,
    Submit,
)
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
        self.cards: list[tuple[str, ApprovalView]] = []
        self.clicked: list[ActionReply] = []

    async def run(self, submit: Submit, act: Act) -> None:
        self.clicked.append(await act(CardAction("k", "allow", "ou_a", "oc_a", "card-1")))

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

    async def show_approval(self, view: ApprovalView) -> str:
        self.cards.append(("new", view))
        return "card-1"

    async def update_approval(self, message_id: str, view: ApprovalView) -> None:
        self.cards.append((message_id, view))

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


def test_approval_cards_are_masked_also_the_one_a_click_answers_with() -> None:
    inner = Recorder()
    channel = MaskedChannel(inner, Masker([KEY]))
    leaky = ApprovalView(key="k", chat_id="oc_a", reply_to="om_1", tool=f"mcp__{KEY}",
                         details=(("Command", f"curl -H 'x-api-key: {KEY}' x"), (KEY, KEY)), approvers=("ou_a",),
                         questions=(Question(f"Use {KEY}?", KEY, (KEY, "no")),))
    masked = ApprovalView(key="k", chat_id="oc_a", reply_to="om_1", tool=f"mcp__{MASK}",
                          details=(("Command", f"curl -H 'x-api-key: {MASK}' x"), (MASK, MASK)), approvers=("ou_a",),
                          questions=(Question(f"Use {MASK}?", MASK, (MASK, "no")),))
    settled = dataclasses.replace(leaky, outcome=f"Answered: {KEY}", decided_by="ou_a", decided_at=1.0)

    async def act(action: CardAction) -> ActionReply:
        return ActionReply(f"Answered: {KEY}.", "success", settled)

    async def use() -> str:
        card = await channel.show_approval(leaky)
        await channel.update_approval(card, settled)
        await channel.run(lambda message: asyncio.sleep(0), act)
        return card

    assert asyncio.run(use()) == "card-1"
    done = dataclasses.replace(masked, outcome=f"Answered: {MASK}", decided_by="ou_a", decided_at=1.0)
    assert inner.cards == [("new", masked), ("card-1", done)]
    assert inner.clicked == [ActionReply(f"Answered: {MASK}.", "success", done)]


def test_a_file_holding_a_secret_is_refused_anywhere_in_it_and_names_and_captions_are_masked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(masking, "FILE_CHUNK", 16)  # the key then spans two chunks
    uploaded: list[OutFile] = []

    class Uploads(Recorder):
        async def upload(self, chat_id: str, file: OutFile) -> str:
            uploaded.append(file)
            return "key"

    inner = Uploads()
    channel = MaskedChannel(inner, Masker([KEY]))
    leaking, clean = tmp_path / "leak.txt", tmp_path / "clean.txt"
    leaking.write_bytes(b"x" * 10 + KEY.encode() + b"y" * 40)
    clean.write_bytes(b"nothing to hide " * 10)
    with pytest.raises(DeliveryFailed) as refused:
        asyncio.run(channel.upload("oc_a", OutFile("file", "leak.txt", str(leaking), 60)))
    assert refused.value.permanent and "secret" in str(refused.value) and KEY not in str(refused.value)
    named = OutFile("file", f"{KEY}.txt", str(clean), 160)
    assert asyncio.run(channel.upload("oc_a", named)) == "key"
    assert [file.name for file in uploaded] == [f"{MASK}.txt"]
    asyncio.run(channel.deliver(Outgoing("oc_a", f"caption {KEY}", "k", "om_1", file=named, upload_key="key")))
    assert (inner.delivered[0].text, inner.delivered[0].file.name) == (f"caption {MASK}", f"{MASK}.txt")
