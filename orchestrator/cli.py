"""orchestrator: Claude Code in Feishu chats, one Docker container per chat."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence

from loguru import logger

from orchestrator import operations
from orchestrator.channels import Channel
from orchestrator.channels.console import CONSOLE_CHAT_ID, ConsoleChannel
from orchestrator.config import ConfigError, Settings, load_settings, resolve_chat
from orchestrator.firewall import FirewallError
from orchestrator.ids import is_valid_chat_id
from orchestrator.logs import setup_logging
from orchestrator.runtime import DockerRuntime, RuntimeFailure, SwarmRuntime, make_runtime
from orchestrator.service import Service
from orchestrator.store import SCHEMA_VERSION, Store, StoreError, migrate_store, public_url


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="orchestrator", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)

    run = _command(commands, "run", "run the service in the foreground")
    run.add_argument("--chat", default=CONSOLE_CHAT_ID,
                     help="without Feishu credentials: the chat id the terminal talks as (default: console)")
    run.add_argument("--log-json", action="store_true", help="log JSON lines instead of text")

    status = _command(commands, "status", "every known chat: container, use of its caps, session, queue")
    status.add_argument("--json", action="store_true", help="print JSON")

    for name, help_text in (("stop", "stop a chat's container (its next message starts it again)"),
                            ("reset", "start a new Claude session for a chat (as /new does)")):
        _command(commands, name, help_text).add_argument("chat", help="the chat id")
    logs = _command(commands, "logs", "a chat's recent messages and what became of them")
    logs.add_argument("chat", help="the chat id")
    logs.add_argument("-n", type=int, default=20, help="how many (default 20)")

    notify = _command(commands, "notify", "post to a chat through the running service's outbox and rate limiter "
                                          "(for scripts and long jobs)")
    notify.add_argument("--chat", required=True, help="the chat id")
    notify.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                        help="wait up to this long for delivery (exit 1 if it has not happened)")
    notify.add_argument("text", help="the message")

    _command(commands, "migrate", "bring the store's schema to this version (PostgreSQL: before the first start and "
                                  "after each upgrade; SQLite does it at start)")

    config = commands.add_parser("config", help="config file commands")
    _command(config.add_subparsers(dest="config_command", required=True), "check", "validate the config file")
    return top


def _command(commands: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=help_text, description=help_text)
    command.add_argument("--config", default="config.yaml", help="the YAML config file (default: config.yaml)")
    return command


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    chat = getattr(args, "chat", None)
    if chat is not None and not is_valid_chat_id(chat):
        print(f"{chat!r} is not a valid chat id (letters, digits, '_', '-')", file=sys.stderr)
        return 2
    if args.command == "config":
        print(f"{args.config}: ok")
        return 0
    if args.command == "run":
        return _run(settings, args.chat, args.log_json or settings.logging.json)
    if args.command == "migrate":
        return _migrate(settings)
    try:
        store = Store(settings.store.url, secrets=settings.secrets)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        return _operate(args, settings, store)
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()


def _operate(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    if args.command == "status":
        try:
            runtime: DockerRuntime | SwarmRuntime | None = make_runtime(settings)
        except RuntimeFailure as exc:
            print(f"warning: {exc}; container states are unknown", file=sys.stderr)
            runtime = None
        try:
            rows = operations.status_rows(settings, store, runtime)
        finally:
            if runtime is not None:
                runtime.close()
        columns = operations.STATUS_COLUMNS + (("node", "usage_from") if any(row["node"] for row in rows) else ())
        print(json.dumps(rows, indent=2) if args.json else operations.format_table(rows, columns))
        return 0
    if args.command == "logs":
        print(operations.recent_turns(store, args.chat, args.n))
        return 0
    if args.command == "reset":
        old = operations.reset_chat(store, args.chat)
        print(f"chat {args.chat}: session {old or '(none)'} forgotten; the next message starts a new one")
        return 0
    if args.command == "stop":
        try:
            print(f"stopped {operations.stop_chat(settings, store, make_runtime(settings), args.chat)}")
        except RuntimeFailure as exc:
            raise LookupError(str(exc)) from exc
        return 0
    delivered, report = operations.notify(store, args.chat, args.text, args.wait)
    print(report, file=sys.stdout if delivered else sys.stderr)
    return 0 if delivered else 1


def _run(settings: Settings, console_chat: str, log_json: bool) -> int:
    setup_logging(json_lines=log_json, level=settings.logging.level, secrets=settings.secrets)
    if not settings.gateway.configured:
        print("No credentials for the model: set ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN) in the environment; the "
              f"config passes it to the model gateway through gateway.api_key (or gateway.auth_token) "
              f"({settings.source}).", file=sys.stderr)
        return 2
    try:
        runtime = make_runtime(settings)
    except RuntimeFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _keep_data_private(settings)
    try:
        store = Store(settings.store.url, secrets=settings.secrets)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        runtime.close()
        return 1
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
        code = asyncio.run(Service(settings, store, runtime, channel).run())
    except (FirewallError, RuntimeFailure) as exc:
        logger.error(f"cannot serve: {exc}")
        return 1
    finally:
        store.close()
        runtime.close()
    logger.info("stopped" if code == 0 else f"stopped with exit code {code}: one of the service's loops died")
    return code


def _migrate(settings: Settings) -> int:
    """The migrations the store lacked, applied and printed one a line (a SQLite store's folder is made as `run`
    makes it)."""
    if settings.store.sqlite_file is not None:
        _keep_data_private(settings)
    where = public_url(settings.store.url)
    try:
        applied = migrate_store(settings.store.url)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for migration in applied:
        print(f"{where}: applied migration {migration.version}: {migration.name}")
    if not applied:
        print(f"{where}: up to date (schema version {SCHEMA_VERSION}), nothing to apply")
    return 0


def _keep_data_private(settings: Settings) -> None:
    """Everything the service writes from now on (the store, the chats' folders, turn requests) has no group or other
    bits, and data_dir is 0700 even if it existed with wider ones. What an agent must read or write is given
    its owner or mode explicitly where it is made (layout, untrusted, model_socket): a mkdir mode is cut by the
    umask."""
    os.umask(0o077)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.data_dir, 0o700)


if __name__ == "__main__":
    sys.exit(main())
