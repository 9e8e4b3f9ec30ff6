"""`orchestrator run | status | notify | config check`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence

from loguru import logger

from orchestrator.channels import Channel
from orchestrator.channels.console import CONSOLE_CHAT_ID, ConsoleChannel
from orchestrator.config import ConfigError, Settings, load_settings, resolve_chat
from orchestrator.ids import is_valid_chat_id
from orchestrator.logs import setup_logging
from orchestrator.runtime import DockerRuntime, RuntimeFailure
from orchestrator.service import Service
from orchestrator.states import State
from orchestrator.store import Store

CREDENTIAL_VARIABLES = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN",
                        "ANTHROPIC_BASE_URL")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orchestrator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the service in the foreground")
    _config_option(run)
    run.add_argument("--chat", default=CONSOLE_CHAT_ID,
                     help="without Feishu credentials: the chat id the terminal talks as (default: console)")
    run.add_argument("--log-json", action="store_true", help="log JSON lines instead of text")

    status = commands.add_parser("status", help="list every known chat and its container")
    _config_option(status)
    status.add_argument("--json", action="store_true", help="print JSON")

    notify = commands.add_parser("notify", help="post a message to a chat through the running service's outbox "
                                                "and rate limiter (for scripts and long jobs)")
    _config_option(notify)
    notify.add_argument("--chat", required=True, help="the chat id")
    notify.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                        help="wait up to this long for delivery (exit 1 if it has not happened)")
    notify.add_argument("text", help="the message")

    config = commands.add_parser("config", help="config file commands")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    _config_option(config_commands.add_parser("check", help="validate the config file"))

    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(f"{args.config}: ok")
        return 0
    if args.command == "status":
        return _status(settings, args.json)
    if args.command == "notify":
        return _notify(settings, args.chat, args.text, args.wait)
    return _run(settings, args.chat, args.log_json)


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="config.yaml", help="the YAML config file (default: config.yaml)")


def _run(settings: Settings, console_chat: str, log_json: bool) -> int:
    setup_logging(json_lines=log_json)
    if not any(name in settings.agent.env for name in CREDENTIAL_VARIABLES):
        print("No credentials for Claude: set ANTHROPIC_API_KEY (or CLAUDE_CODE_OAUTH_TOKEN, or "
              "ANTHROPIC_BASE_URL for a gateway) in the environment; the config passes it on through "
              f"agent.env ({settings.source}).", file=sys.stderr)
        return 2
    if not is_valid_chat_id(console_chat):
        print(f"--chat {console_chat!r} is not a valid chat id (letters, digits, '_', '-')", file=sys.stderr)
        return 2
    try:
        runtime = DockerRuntime()
    except RuntimeFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    store = Store(settings.db_path)
    channel: Channel
    if settings.feishu.configured:
        from orchestrator.channels.feishu import FeishuChannel  # lark_oapi takes a second to import: only here

        def require_mention(chat_id: str) -> bool:
            return resolve_chat(settings, chat_id).options.require_mention

        channel = FeishuChannel(settings.feishu, require_mention)
        where = f"Feishu ({settings.feishu.mode}, {settings.feishu.domain})"
    else:
        channel = ConsoleChannel(console_chat)
        where = f"the terminal as chat {console_chat}"
    logger.info(f"data in {settings.data_dir}; agent image {settings.agent.image}; talking to {where}")
    try:
        asyncio.run(Service(settings, store, runtime, channel).run())
    finally:
        store.close()
        runtime.close()
    logger.info("stopped")
    return 0


def _notify(settings: Settings, chat_id: str, text: str, wait: float) -> int:
    if not is_valid_chat_id(chat_id):
        print(f"--chat {chat_id!r} is not a valid chat id", file=sys.stderr)
        return 2
    store = Store(settings.db_path)
    item = store.say(chat_id, text)
    print(f"queued as outbox item {item.id}")
    deadline = time.monotonic() + wait
    while store.outbox_item(item.id).state == "pending" and time.monotonic() < deadline:
        time.sleep(0.2)
    state = store.outbox_item(item.id)
    store.close()
    if wait and state.state != "sent":
        print(f"not delivered yet ({state.state}; {state.last_error or 'the service has not sent it'}); "
              "it stays queued", file=sys.stderr)
        return 1
    return 0


def _status(settings: Settings, as_json: bool) -> int:
    store = Store(settings.db_path)
    chats = store.chats()
    unfinished = store.unfinished_messages()
    try:
        runtime = DockerRuntime()
        states = {state.name: state for state in asyncio.run(runtime.list_managed(settings.instance))}
        runtime.close()
    except RuntimeFailure as exc:
        print(f"warning: {exc}; container states are unknown", file=sys.stderr)
        states = None
    rows = []
    for chat in chats:
        state = states.get(chat.container_name) if states is not None else None
        mine = [m for m in unfinished if m.chat_id == chat.chat_id]
        rows.append({
            "chat_id": chat.chat_id,
            "name": chat.name,
            "container_name": chat.container_name,
            "container_id": state.id if state else chat.container_id,
            "container_state": ("unknown" if states is None else state.status if state else "missing"),
            "session_id": chat.session_id,
            "last_activity": chat.last_activity,
            "busy": any(m.state is State.RUNNING for m in mine),
            "queued": sum(1 for m in mine if m.state in (State.RECEIVED, State.QUEUED)),
        })
    store.close()
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ("chat_id", "container_name", "container_state", "session_id", "last_activity", "busy", "queued")
    table = [columns, *[tuple(_cell(row[c]) for c in columns) for row in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    return 0


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
