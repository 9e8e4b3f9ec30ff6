"""YAML config → typed settings, and the one pure function that resolves a chat's settings.

Every error names the file and the key (`config.yaml: defaults.memory: ...`). Strings may use `${VAR}`
or `${VAR:-default}`; a missing variable without a default is an error.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from orchestrator.ids import is_valid_chat_id

PERMISSION_MODES = ("acceptEdits", "auto", "bypassPermissions", "default", "dontAsk", "manual", "plan")
FEISHU_MODES = ("websocket", "webhook")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Flags the orchestrator sets itself on every turn; `agent.extra_args` may not override them.
RESERVED_CLI_FLAGS = ("-p", "--print", "--output-format", "--input-format", "--resume", "-r",
                      "--session-id", "--continue", "-c", "--verbose", "--permission-mode", "--permission-prompt-tool",
                      "--allowedTools", "--allowed-tools", "--dangerously-skip-permissions",
                      "--setting-sources")
# A chat in this mode never asks; any other mode asks an approver in the chat before the tools it guards.
NO_APPROVALS = "bypassPermissions"
_OPEN_ID = re.compile(r"ou_[A-Za-z0-9_-]{1,64}")
# Claude Code's permission-rule syntax: a tool name, optionally with a specifier in parentheses (Bash(ls:*)).
_PERMISSION_RULE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*(\([^()\n]{1,200}\))?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)([bkmg]?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_MIN_MEMORY = 6 * 1024**2  # the Docker engine refuses less
INSTANCE_NETWORK = "instance"
SAFE_NETWORKS = (INSTANCE_NETWORK, "none")
# Set by the orchestrator in every agent container (the gateway's address and the chat's token, the proxy):
# `agent.env` may not set them, and the model's key goes to `gateway`, never into a container.
RESERVED_AGENT_ENV = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "CLAUDE_CODE_OAUTH_TOKEN",
                      "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
EGRESS_MODES = ("allowlist", "open", "none")
RUNTIMES = ("docker", "swarm")
# A Swarm placement constraint: a node attribute, == or !=, a value (Swarm's own syntax, checked here so that a typo
# is a config error, not a chat whose service never finds a node). A spread preference names an attribute alone.
_NODE_ATTRIBUTE = r"(?:node\.(?:id|hostname|role|platform\.os|platform\.arch)|(?:node|engine)\.labels\.[A-Za-z0-9_.-]+)"
_CONSTRAINT = re.compile(rf"{_NODE_ATTRIBUTE}\s*(?:==|!=)\s*[A-Za-z0-9_.:/-]+")
_SPREAD = re.compile(_NODE_ATTRIBUTE)
# A manager's engine by its unix socket only: docker-py is given no TLS settings, so tcp:// would be the engine's API
# without authentication (whoever reaches the port, a chat placed on that node included, owns the Swarm), and ssh://
# needs paramiko, which is not installed.
_ENGINE_URL = re.compile(r"unix:///\S+")
THREAD_MODES = ("per_thread", "shared")
# What an agent may reach through the egress proxy unless the config says otherwise: the usual package
# registries (npm, PyPI, Debian, GitHub, Go, crates.io, RubyGems, Maven Central). The model is not here: agents
# reach it through the gateway's socket in their container, not over the network.
DEFAULT_EGRESS_ALLOW = (
    "registry.npmjs.org", "registry.yarnpkg.com",
    "pypi.org", "files.pythonhosted.org",
    "deb.debian.org", "security.debian.org",
    "github.com", "codeload.github.com", "objects.githubusercontent.com", "raw.githubusercontent.com",
    "proxy.golang.org", "sum.golang.org",
    "crates.io", "static.crates.io", "index.crates.io",
    "rubygems.org", "repo.maven.apache.org", "repo1.maven.org",
)
_DOMAIN_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN_PATTERN = re.compile(rf"(?:\*\.)?{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*")
_TIME_OF_DAY = re.compile(r"([01]\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?")


T = TypeVar("T")


class ConfigError(Exception):
    """A config problem, worded for the operator: file, key, what is wrong."""


@dataclass(frozen=True)
class Egress:
    """Where a chat's agent may connect. `allowlist`: only through the instance's proxy, to `allow` (domains, and
    `*.suffix` for a domain's subdomains); `open`: straight out (still not to the host or private addresses);
    `none`: no network at all. The model is reached through the gateway whatever this says."""

    mode: str = "allowlist"
    allow: tuple[str, ...] = DEFAULT_EGRESS_ALLOW


@dataclass(frozen=True)
class Placement:
    """Where Swarm may run a chat's service (runtime: swarm only): node constraints such as `node.labels.gpu==true`,
    spread preferences such as `node.labels.zone`, and what the scheduler reserves for it on its node."""

    constraints: tuple[str, ...] = ()
    spread: tuple[str, ...] = ()
    reserve_cpus: float = 0.0  # 0: none reserved
    reserve_memory: int = 0  # bytes; 0: none reserved

    @property
    def configured(self) -> bool:
        return self != Placement()


@dataclass(frozen=True)
class ChatOptions:
    """How one chat is served. `defaults` sets them for all chats, `groups.<chat_id>` per chat."""

    cpus: float = 1.0
    memory: int = 2 * 1024**3
    pids_limit: int = 256
    # `instance`: the instance's own network (no neighbours, no host, no private or link-local addresses);
    # `none`: no network. Anything else (host, bridge, container:<x>, a network's name) needs unsafe_network.
    network: str = INSTANCE_NETWORK
    unsafe_network: bool = False  # allow a network that reaches the host, other chats or private addresses
    workspace: str | None = None  # host folder; None: <chats_dir>/<chat_id>/workspace
    require_mention: bool = True  # in a group chat, answer only when the bot is mentioned
    disk: int = 10 * 1024**3  # the chat's folders at most; over it, its turn is stopped and the chat told
    tmp_size: int = 256 * 1024**2  # the container's /tmp (a tmpfs, counted in its memory); its root is read-only
    egress: Egress = field(default_factory=Egress)  # on the instance network: what the agent may reach
    # bypassPermissions: the container is the sandbox, nothing is asked. Another mode (default, acceptEdits, ...):
    # the CLI asks before the tools that mode guards, and an approver decides in the chat.
    permission_mode: str = NO_APPROVALS
    approvers: tuple[str, ...] = ()  # open ids who may decide, besides the sender of the message being answered
    auto_allow: tuple[str, ...] = ()  # permission rules never asked (Claude Code's syntax: Read, Bash(git status:*))
    approval_timeout: float = 600.0  # seconds an approval waits; then the tool is denied and the chat told
    threads: str = "per_thread"  # per_thread: each topic (thread) of a chat has its own session; shared: one
    placement: Placement = field(default_factory=Placement)  # runtime: swarm: where the chat's service may run

    def conversation(self, thread_id: str) -> str:
        """Which conversation of the chat a message in `thread_id` ("": none) belongs to: "" is the chat's own."""
        return thread_id if self.threads == "per_thread" else ""

    @property
    def asks_approval(self) -> bool:
        return self.permission_mode != NO_APPROVALS


@dataclass(frozen=True)
class AgentSettings:
    image: str = "claude-runner:latest"
    env: Mapping[str, str] = field(default_factory=dict)
    model: str | None = None
    extra_args: tuple[str, ...] = ()
    idle_timeout: float = 600.0  # seconds without any CLI output before a turn is called hung
    turn_timeout: float = 3600.0  # seconds a turn may take in all: no chat holds a turn slot for ever
    hot_idle: float = 600.0  # seconds a chat's CLI process stays after its last turn, then exits (its memory back)
    uid: int = 1000  # the image's agent user; owns the chat folders mounted into the container


@dataclass(frozen=True)
class FeishuSettings:
    app_id: str = ""
    app_secret: str = ""
    domain: str = "https://open.feishu.cn"
    mode: str = "websocket"
    verification_token: str = ""
    encrypt_key: str = ""
    rate_per_chat: int = 5  # sends per second to one chat (Feishu: 5 QPS per user and per group)
    rate_per_app: int = 50  # sends per second for the whole app
    rate_per_app_minute: int = 1000  # sends per minute for the whole app
    webhook_host: str = "127.0.0.1"  # webhook mode: where the event endpoint listens
    webhook_port: int = 8080
    webhook_path: str = "/feishu/events"
    webhook_max_body: int = 1024**2  # webhook mode: bytes of one request body at most (413 beyond, unread)
    webhook_max_concurrent: int = 64  # webhook mode: connections open at once (503 beyond)
    webhook_max_per_client: int = 8  # webhook mode: of those, from one IPv4 address or IPv6 /64 (503 beyond)
    webhook_timeout: float = 10.0  # webhook mode: seconds for a request to arrive in full (408 beyond)
    reconnect_after: float = 30.0  # websocket mode: seconds the long connection may stay down before it is rebuilt

    @property
    def configured(self) -> bool:
        return bool(self.app_id and self.app_secret)


@dataclass(frozen=True)
class AccessSettings:
    """Deny by default. `"*"` (as the whole value or an item) allows every chat or user."""

    allowed_chats: tuple[str, ...] = ()
    allowed_users: tuple[str, ...] = ()

    def allows(self, chat_id: str, user_id: str) -> bool:
        return _allowed(self.allowed_chats, chat_id) and _allowed(self.allowed_users, user_id)


def _allowed(allowlist: tuple[str, ...], value: str) -> bool:
    return "*" in allowlist or value in allowlist


@dataclass(frozen=True)
class SchedulerSettings:
    max_concurrent_turns: int = 4  # turns running at once over all chats; waiting chats are served in order
    queue_depth: int = 10  # messages one chat may have waiting behind its running turn


@dataclass(frozen=True)
class ContainerSettings:
    idle_stop: float = 1800.0  # seconds without a turn before a chat's container is stopped
    max_running: int = 0  # running containers at most (0: no cap); the least recently used idle ones stop first
    stop_timeout: float = 10.0  # seconds between SIGTERM and SIGKILL when a container is stopped


@dataclass(frozen=True)
class ShutdownSettings:
    drain_timeout: float = 60.0  # on SIGTERM/SIGINT, how long running turns may take to finish
    keep_containers: bool = False  # leave containers and their turns running (upgrades); the next start adopts them


@dataclass(frozen=True)
class LimitSettings:
    """Bounds on what the orchestrator reads from an agent (all of it is hostile input) and on the disk."""

    line_bytes: int = 1024**2  # one line of CLI output; a longer one is skipped and noted in the log
    output_bytes: int = 64 * 1024**2  # all output of one turn; past it the turn is stopped and the user told
    answer_bytes: int = 1_000_000  # answer text of one turn; the rest is cut with a note saying so
    min_free_disk: int = 256 * 1024**2  # below this much free space for data_dir or chats_dir, no turn starts
    disk_check_interval: float = 5.0  # seconds between measurements of a busy chat's folders


@dataclass(frozen=True)
class FileSettings:
    """Files people send with their messages (and, later, files the agent sends back)."""

    max_bytes: int = 30 * 1024**2  # one file; a bigger one is refused with a message naming the limit
    message_bytes: int = 100 * 1024**2  # all files of one message together
    # An answer longer than this goes as a markdown file, its beginning in the card; 0: always as messages. Past
    # ~64 kB an answer is a dozen messages, which a file beats.
    answer_as_file_bytes: int = 64 * 1024
    # Seconds a message of files only waits for its sender's next text (one turn for both: people paste a screenshot,
    # then type the question); 0: it is answered at once.
    wait_for_text: float = 30.0


@dataclass(frozen=True)
class GatewaySettings:
    """The model gateway: the only place that holds the model's key. Agents reach it through their chat's socket."""

    upstream_url: str = "https://api.anthropic.com"  # the Messages API, or the operator's own gateway in front of it
    api_key: str = ""  # sent upstream as x-api-key
    auth_token: str = ""  # or this, as Authorization: Bearer (an operator's gateway that wants one)
    image: str = "orchestrator:latest"  # the gateway container runs this image (the orchestrator's own)
    max_request_bytes: int = 32 * 1024**2  # one request body at most (413 beyond)
    request_timeout: float = 900.0  # seconds one model request may take upstream in all, streaming included
    max_concurrent: int = 8  # model requests at once per chat (429 beyond)

    @property
    def configured(self) -> bool:
        return bool(self.api_key or self.auth_token)


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input: Decimal
    output: Decimal
    cache_write: Decimal
    cache_read: Decimal


def _price(input: str, output: str, cache_write: str, cache_read: str) -> Price:
    return Price(Decimal(input), Decimal(output), Decimal(cache_write), Decimal(cache_read))


# Anthropic's list prices (USD per million tokens; cache writes at the 5-minute rate). A model is priced by the
# longest key its name starts with; `default` prices any other (the dearest, so an unknown model errs on the safe
# side of a budget).
DEFAULT_PRICES: Mapping[str, Price] = {
    "claude-opus-4-5": _price("5", "25", "6.25", "0.50"),
    "claude-opus-4": _price("15", "75", "18.75", "1.50"),
    "claude-sonnet-4": _price("3", "15", "3.75", "0.30"),
    "claude-3-7-sonnet": _price("3", "15", "3.75", "0.30"),
    "claude-haiku-4": _price("1", "5", "1.25", "0.10"),
    "claude-3-5-haiku": _price("0.80", "4", "1", "0.08"),
    "default": _price("15", "75", "18.75", "1.50"),
}
BUDGET_LIMITS = ("per_chat_daily_usd", "per_user_daily_usd", "instance_daily_usd",
                 "per_chat_monthly_usd", "per_user_monthly_usd", "instance_monthly_usd")


@dataclass(frozen=True)
class BudgetSettings:
    """Spending caps in USD, priced from the gateway's usage records; None: no cap. A day starts at `reset_at` in
    `timezone`, a month on its first day at that time."""

    per_chat_daily_usd: Decimal | None = None
    per_user_daily_usd: Decimal | None = None
    instance_daily_usd: Decimal | None = None
    per_chat_monthly_usd: Decimal | None = None
    per_user_monthly_usd: Decimal | None = None
    instance_monthly_usd: Decimal | None = None
    timezone: str = "UTC"
    reset_at: str = "00:00"  # HH:MM or HH:MM:SS
    footer: bool = True  # every answer ends with a line of what the turn and the chat's day cost
    prices: Mapping[str, Price] = field(default_factory=lambda: dict(DEFAULT_PRICES))


SQLITE_URL = "sqlite:///"  # then the file's path, as written (absolute: four slashes)
POSTGRES_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True)
class StoreSettings:
    """Where the state is kept: a SQLite file in data_dir (one host), or a PostgreSQL database (several)."""

    url: str = ""  # "": sqlite:///<data_dir>/orchestrator.db (Settings fills it in)

    @property
    def sqlite_file(self) -> Path | None:
        return sqlite_file(self.url)


def sqlite_file(url: str) -> Path | None:
    """The file of a `sqlite:///FILE` URL (taken as written: no %-decoding), or None for another URL."""
    return Path(url[len(SQLITE_URL):]) if url.startswith(SQLITE_URL) else None


def url_secrets(url: str) -> list[str]:
    """The password in a store URL, as written and %-decoded: never printed."""
    password = urlsplit(url).password if sqlite_file(url) is None else None
    return list(dict.fromkeys((password, unquote(password)))) if password else []


@dataclass(frozen=True)
class SwarmSettings:
    """runtime: swarm: the engine of a Swarm manager, where each chat is a service."""

    manager: str = ""  # unix:///path (a manager's socket, mounted or forwarded); "": the local engine (DOCKER_HOST)
    # The orchestrator's image in a registry every node pulls from: each node runs the instance's guard (the node's
    # firewall rules for the chats' bridge) and model gateway (the chats' sockets there) from it. Required on Swarm.
    orchestrator_image: str = ""
    # How long a chat's start waits for its task to run (the first on a node pulls the agent image: about a minute
    # for 1.2 GB); then the service is scaled back to zero and the message answered with the error.
    start_timeout: float = 300.0
    # The port of the instance's egress proxy on every node's loopback (127.0.0.1 only; it runs on the node's
    # network when a chat's egress is an allowlist): free on every node, and another for each instance on the Swarm.
    egress_port: int = 3128


@dataclass(frozen=True)
class MetricsSettings:
    listen: str = ""  # host:port for /metrics and /healthz; empty: off


@dataclass(frozen=True)
class LoggingSettings:
    json: bool = False  # JSON lines instead of text (also: orchestrator run --log-json)
    level: str = "INFO"


@dataclass(frozen=True)
class Settings:
    source: Path
    data_dir: Path
    chats_dir: Path | None = None  # the chats' folders; None: <data_dir>/chats (another filesystem is better)
    instance: str = "orchestrator"
    runtime: str = "docker"  # docker: a container per chat on this host's engine; swarm: a Swarm service per chat
    swarm: SwarmSettings = field(default_factory=SwarmSettings)
    agent: AgentSettings = field(default_factory=AgentSettings)
    defaults: ChatOptions = field(default_factory=ChatOptions)
    groups: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    access: AccessSettings = field(default_factory=AccessSettings)
    feishu: FeishuSettings = field(default_factory=FeishuSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    containers: ContainerSettings = field(default_factory=ContainerSettings)
    shutdown: ShutdownSettings = field(default_factory=ShutdownSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    files: FileSettings = field(default_factory=FileSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    budgets: BudgetSettings = field(default_factory=BudgetSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)

    def __post_init__(self) -> None:
        if self.chats_dir is None:
            object.__setattr__(self, "chats_dir", self.data_dir / "chats")
        if not self.store.url:
            object.__setattr__(self, "store", StoreSettings(f"{SQLITE_URL}{self.db_path}"))

    @property
    def db_path(self) -> Path:
        return self.data_dir / "orchestrator.db"

    @property
    def secrets(self) -> list[str]:
        """Values that must never be printed: the app secret, webhook keys, the store's password, credentials passed
        to agents."""
        sensitive = ("KEY", "TOKEN", "SECRET", "PASSWORD")
        values = [self.feishu.app_secret, self.feishu.encrypt_key, self.feishu.verification_token,
                  self.gateway.api_key, self.gateway.auth_token, *url_secrets(self.store.url),
                  *(value for name, value in self.agent.env.items() if any(s in name.upper() for s in sensitive))]
        return [value for value in values if len(value) >= 4]


@dataclass(frozen=True)
class ChatSettings:
    """Everything that decides one chat's container, resolved from defaults and its group entry."""

    chat_id: str
    options: ChatOptions
    workspace: Path


def resolve_chat(settings: Settings, chat_id: str) -> ChatSettings:
    """Defaults overlaid with `groups.<chat_id>`; the workspace made an absolute host path."""
    options = dataclasses.replace(settings.defaults, **settings.groups.get(chat_id, {}))
    if options.workspace is None:
        workspace = settings.chats_dir / chat_id / "workspace"
    else:
        workspace = settings.data_dir / options.workspace.replace("{chat_id}", chat_id)
    return ChatSettings(chat_id=chat_id, options=options, workspace=workspace)


# ---- loading ----------------------------------------------------------------------------------------


def load_settings(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Settings:
    source = Path(path).resolve()
    try:
        raw = yaml.safe_load(source.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_settings(raw or {}, source, os.environ if environ is None else environ)


def parse_settings(raw: object, source: Path, environ: Mapping[str, str]) -> Settings:
    reader = _Reader(source.name, environ)
    top = reader.section(raw, "", ("data_dir", "chats_dir", "instance", "runtime", "swarm", "agent", "defaults",
                                   "groups", "access", "feishu", "scheduler", "containers", "shutdown", "limits",
                                   "files", "gateway", "budgets", "store", "metrics", "logging"))
    data_dir = _absolute(Path(reader.string(top, "data_dir", "./data")), source)
    defaults = reader.options(top.get("defaults"), "defaults", ChatOptions())
    if defaults.workspace is not None and "{chat_id}" not in defaults.workspace:
        raise reader.error("defaults.workspace", "must contain {chat_id}, or every chat would share one folder")
    instance = reader.string(top, "instance", "orchestrator")
    if not is_valid_chat_id(instance):
        raise reader.error("instance", f"{instance!r} must be letters, digits, '_' or '-'")
    groups = reader.groups(top.get("groups"))
    reader.check_network(defaults, "defaults")
    for chat_id, overrides in groups.items():
        reader.check_network(dataclasses.replace(defaults, **overrides), f"groups.{chat_id}")
    chats_dir = top.get("chats_dir")
    runtime = reader.value(top, "runtime", "", "docker", _choice(RUNTIMES))
    reader.check_runtime(runtime, top, defaults, groups)
    settings = Settings(
        source=source,
        data_dir=data_dir,
        chats_dir=_absolute(Path(reader.string(top, "chats_dir", "")), source) if chats_dir else None,
        instance=instance,
        runtime=runtime,
        swarm=reader.flat(top.get("swarm"), "swarm", SwarmSettings, {  # orchestrator_image: a string, the default
            "manager": _engine_url, "start_timeout": _positive_number, "egress_port": _port}),
        agent=reader.agent(top.get("agent")),
        defaults=defaults,
        groups=groups,
        access=reader.access(top.get("access")),
        feishu=reader.feishu(top.get("feishu")),
        scheduler=reader.flat(top.get("scheduler"), "scheduler", SchedulerSettings, {
            "max_concurrent_turns": _positive_int, "queue_depth": _positive_int}),
        containers=reader.flat(top.get("containers"), "containers", ContainerSettings, {
            "idle_stop": _positive_number, "max_running": _count, "stop_timeout": _positive_number}),
        shutdown=reader.flat(top.get("shutdown"), "shutdown", ShutdownSettings, {
            "drain_timeout": _non_negative_number, "keep_containers": _boolean}),
        limits=reader.flat(top.get("limits"), "limits", LimitSettings, {
            "line_bytes": _size(1024), "output_bytes": _size(1024), "answer_bytes": _size(1024),
            "min_free_disk": _size(0), "disk_check_interval": _positive_number}),
        files=reader.flat(top.get("files"), "files", FileSettings, {
            "max_bytes": _size(1024), "message_bytes": _size(1024), "answer_as_file_bytes": _size(0),
            "wait_for_text": _non_negative_number}),
        gateway=reader.flat(top.get("gateway"), "gateway", GatewaySettings, {
            "upstream_url": _http_url, "max_request_bytes": _size(1024), "request_timeout": _positive_number,
            "max_concurrent": _positive_int}),
        budgets=reader.budgets(top.get("budgets")),
        store=reader.store(top.get("store"), data_dir, source),
        metrics=reader.flat(top.get("metrics"), "metrics", MetricsSettings, {"listen": _listen_address}),
        logging=reader.flat(top.get("logging"), "logging", LoggingSettings, {
            "json": _boolean, "level": _choice(LOG_LEVELS)}),
    )
    if runtime == "swarm" and not settings.swarm.orchestrator_image:
        raise reader.error("swarm.orchestrator_image", "is required on runtime: swarm: the orchestrator's image in a "
                           "registry every node pulls from (images/build.sh --orchestrator --push REGISTRY), which "
                           "each node runs to close the chats' network and to serve their model gateway")
    for key, folder in (("data_dir", settings.data_dir), ("chats_dir", settings.chats_dir)):
        if runtime == "swarm" and _overlaps(_normal(folder), NODE_FOLDER):
            raise reader.error(key, f"{str(folder)!r} is, holds or is inside {NODE_FOLDER}, each Swarm node's own "
                                    "folder (its gateway's sockets for the chats on it): use the shared storage")
    if runtime == "swarm" and settings.store.sqlite_file is not None:
        raise reader.error("store.url", "runtime: swarm needs a PostgreSQL store (postgresql://...): the model gateway "
                           "on every node writes to it, and SQLite's locks do not hold between hosts nor on NFS")
    _check_workspaces(settings, reader)
    return settings


# The service's own folders under data_dir: a workspace there would hand one of them to an agent.
_SERVICE_FOLDERS = ("run", "egress")

# runtime: swarm: a folder of every node's own, which the operator makes once per node (root's, 0755): each node's
# model gateway binds there the sockets of the chats whose tasks may run on it (a unix socket does not cross hosts).
# No workspace may be, hold or lie in it: a chat would reach the other chats' sockets.
NODE_FOLDER = Path("/var/lib/orchestrator")


def _check_workspaces(settings: Settings, reader: _Reader) -> None:
    """A configured workspace becomes the agent's: it must not be, or hold, a folder of the service's (the chats'
    folders, data_dir itself, its run and egress folders), where root reads and deletes names it made."""
    templates = [("defaults.workspace", settings.defaults.workspace)]
    templates += [(f"groups.{chat_id}.workspace", overrides.get("workspace")) for chat_id, overrides in
                  settings.groups.items()]
    assert settings.chats_dir is not None
    data_dir, chats_dir = _normal(settings.data_dir), _normal(settings.chats_dir)
    for key, template in templates:
        if template is None:
            continue
        folder = _normal(data_dir / template.replace("{chat_id}", "oc_example"))
        inside = folder.relative_to(data_dir).parts if folder.is_relative_to(data_dir) else ()
        if _overlaps(folder, chats_dir) or data_dir.is_relative_to(folder) \
                or (inside and inside[0] in _SERVICE_FOLDERS) or _overlaps(folder, NODE_FOLDER):
            raise reader.error(key, f"{template!r} is, holds or is inside a folder of the service's (chats_dir, "
                                    f"data_dir, its run or egress folder, {NODE_FOLDER}): put workspaces elsewhere")


def _normal(folder: Path) -> Path:
    """The folder with its `.` and `..` taken out, as written (a link is not followed: see docs/SCALING.md)."""
    return Path(os.path.normpath(folder))


def _overlaps(one: Path, other: Path) -> bool:
    """Whether `one` is, holds or lies in `other` (both normal)."""
    return one.is_relative_to(other) or other.is_relative_to(one)


class _Reader:
    """Walks the raw YAML, interpolating ${VAR} and converting values, with the key path for errors."""

    def __init__(self, filename: str, environ: Mapping[str, str]) -> None:
        self.filename = filename
        self.environ = environ

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.filename}: {key}: {problem}")

    def section(self, raw: object, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        where = key or "top level"
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.error(where, "must be a mapping of keys to values")
        for name in raw:
            if name not in allowed:
                raise self.error(_join(key, str(name)), f"unknown key (known here: {', '.join(allowed)})")
        return {name: self.interpolate(value, _join(key, name)) for name, value in raw.items()}

    def interpolate(self, value: Any, key: str) -> Any:
        """${VAR} in a string, or in each string of a list; numbers and booleans are parsed later from the
        resulting string by the key's converter."""
        if isinstance(value, list):
            return [self.interpolate(item, f"{key}[{n}]") for n, item in enumerate(value)]
        if not isinstance(value, str):
            return value

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in self.environ:
                return self.environ[name]
            if default is not None:
                return default
            raise self.error(key, f"${{{name}}} is not set in the environment")

        return _ENV_REF.sub(substitute, value)

    def value(self, raw: Mapping[str, Any], name: str, key: str, default: Any,
              convert: Callable[[Any], Any]) -> Any:
        if name not in raw or raw[name] is None:
            return default
        try:
            return convert(raw[name])
        except (TypeError, ValueError) as exc:
            raise self.error(_join(key, name), str(exc)) from None

    def string(self, raw: Mapping[str, Any], name: str, default: Any, key: str = "") -> Any:
        return self.value(raw, name, key, default, _string)

    def options(self, raw: object, key: str, base: ChatOptions) -> ChatOptions:
        return dataclasses.replace(base, **self.option_overrides(raw, key))

    def option_overrides(self, raw: object, key: str) -> dict[str, Any]:
        fields = {"cpus": _cpus, "memory": _memory, "pids_limit": _positive_int, "network": _network,
                  "unsafe_network": _boolean, "workspace": _string, "require_mention": _boolean,
                  "disk": _size(1024**2), "tmp_size": _size(1024**2), "egress": _egress,
                  "permission_mode": _choice(PERMISSION_MODES), "approvers": _open_ids,
                  "auto_allow": _permission_rules, "approval_timeout": _positive_number,
                  "threads": _choice(THREAD_MODES), "placement": _placement}
        section = self.section(raw, key, tuple(fields))
        return {name: self.value(section, name, key, None, convert)
                for name, convert in fields.items() if section.get(name) is not None}

    def check_network(self, options: ChatOptions, key: str) -> None:
        if options.network not in SAFE_NETWORKS and not options.unsafe_network:
            raise self.error(f"{key}.network", f"{options.network!r} lets the agent reach the host, other chats or "
                             f"private addresses; use {' or '.join(SAFE_NETWORKS)}, or set {key}.unsafe_network: "
                             "true to accept that risk")

    def check_runtime(self, runtime: str, top: Mapping[str, Any], defaults: ChatOptions,
                      groups: Mapping[str, Mapping[str, Any]]) -> None:
        """What each runtime cannot do, refused here rather than at a chat's first message. On Swarm a chat's service
        may run on any node: an allowlist is served by the instance's egress proxy on every node, `open` egress by a
        network of the instance's on every node, closed by each node's guard (docs/SCALING.md); an operator's
        network is not served."""
        chats = [("defaults", defaults), *((f"groups.{chat_id}", dataclasses.replace(defaults, **overrides))
                                           for chat_id, overrides in groups.items())]
        if runtime == "docker":
            if top.get("swarm") is not None:
                raise self.error("swarm", "applies to runtime: swarm only")
            for key, options in chats:
                if options.placement.configured:
                    raise self.error(f"{key}.placement", "applies to runtime: swarm only (one host places nothing)")
            return
        for key, options in chats:
            if options.network not in SAFE_NETWORKS:
                raise self.error(f"{key}.network", f"{options.network!r}: on runtime: swarm a chat's service is on the "
                                 "instance's Swarm network (instance or none); no other network is served")
            if options.placement.reserve_cpus > options.cpus:
                raise self.error(f"{key}.placement.reserve_cpus", f"{options.placement.reserve_cpus:g} is more than "
                                 f"the chat's CPU cap ({options.cpus:g})")
            if options.placement.reserve_memory > options.memory:
                raise self.error(f"{key}.placement.reserve_memory", "is more than the chat's memory cap")

    def groups(self, raw: object) -> dict[str, dict[str, Any]]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self.error("groups", "must map chat ids to their settings")
        groups = {}
        for chat_id, group in raw.items():
            if not is_valid_chat_id(chat_id):
                raise self.error(f"groups.{chat_id}", "not a valid chat id (letters, digits, '_', '-')")
            groups[chat_id] = self.option_overrides(group, f"groups.{chat_id}")
        return groups

    def agent(self, raw: object) -> AgentSettings:
        key = "agent"
        if isinstance(raw, dict) and "permission_mode" in raw:
            raise self.error("agent.permission_mode", "moved to defaults.permission_mode (per group since approvals: "
                             "groups.<chat_id>.permission_mode)")
        section = self.section(raw, key, tuple(f.name for f in dataclasses.fields(AgentSettings)))
        env = section.get("env") or {}
        if not isinstance(env, dict):
            raise self.error("agent.env", "must map variable names to values")
        env = {str(name): self.interpolate(value, f"agent.env.{name}") for name, value in env.items()}
        for name, value in env.items():
            if not _ENV_NAME.fullmatch(name):
                raise self.error(f"agent.env.{name}", "is not a variable name (letters, digits and _)")
            if "\0" in str(value):
                raise self.error(f"agent.env.{name}", "may not hold a NUL character")
            if name in RESERVED_AGENT_ENV and value not in (None, ""):
                raise self.error(f"agent.env.{name}", "is set by the orchestrator: agents reach the model through the "
                                 "gateway and the network through the egress proxy; the model's key and address go "
                                 "in gateway.api_key (or gateway.auth_token) and gateway.upstream_url")
        extra_args = self.value(section, "extra_args", key, (), _string_list)
        for arg in extra_args:
            if arg.split("=", 1)[0] in RESERVED_CLI_FLAGS:
                raise self.error("agent.extra_args", f"{arg!r} is set by the orchestrator itself")
        defaults = AgentSettings()
        return AgentSettings(
            image=self.value(section, "image", key, defaults.image, _string),
            env={name: str(value) for name, value in env.items() if value not in (None, "")},
            model=self.value(section, "model", key, None, _string),
            extra_args=extra_args,
            idle_timeout=self.value(section, "idle_timeout", key, defaults.idle_timeout, _positive_number),
            turn_timeout=self.value(section, "turn_timeout", key, defaults.turn_timeout, _positive_number),
            hot_idle=self.value(section, "hot_idle", key, defaults.hot_idle, _positive_number),
            uid=self.value(section, "uid", key, defaults.uid, _positive_int),
        )

    def budgets(self, raw: object) -> BudgetSettings:
        key = "budgets"
        section = self.section(raw, key, tuple(f.name for f in dataclasses.fields(BudgetSettings)))
        limits = {name: self.value(section, name, key, None, _money) for name in BUDGET_LIMITS}
        prices = dict(DEFAULT_PRICES)
        raw_prices = section.get("prices") or {}
        if not isinstance(raw_prices, dict):
            raise self.error("budgets.prices", "must map model name prefixes to prices")
        for model, raw_price in raw_prices.items():
            where = f"budgets.prices.{model}"
            price = self.section(raw_price, where, ("input", "output", "cache_write", "cache_read"))
            missing = [name for name in ("input", "output", "cache_write", "cache_read") if name not in price]
            if missing:
                raise self.error(where, f"needs {', '.join(missing)} (USD per million tokens)")
            prices[str(model)] = Price(**{name: self.value(price, name, where, None, _money) for name in price})
        return BudgetSettings(
            **{name: value for name, value in limits.items() if value is not None},
            timezone=self.value(section, "timezone", key, "UTC", _timezone),
            reset_at=self.value(section, "reset_at", key, "00:00", _time_of_day),
            footer=self.value(section, "footer", key, True, _boolean),
            prices=prices,
        )

    def store(self, raw: object, data_dir: Path, source: Path) -> StoreSettings:
        """`sqlite:///FILE`, a .db file directly in data_dir (the gateway's container mounts data_dir, and nothing else
        there is the agents'; relative: to the config file's folder), or `postgresql://user:password@host:port/db`
        (the password %-encoded where it holds other than letters, digits and -._~). Unset: the default."""
        section = self.section(raw, "store", ("url",))
        url = self.string(section, "url", "", "store")
        if not url:
            return StoreSettings()
        file = sqlite_file(url)
        if file is not None:
            file = _absolute(file, source)
            if file.parent != data_dir or file.suffix != ".db":
                raise self.error("store.url", f"a SQLite store must be a .db file directly in data_dir ({data_dir})")
            return StoreSettings(f"{SQLITE_URL}{file}")
        if not _is_postgres_url(url):
            raise self.error("store.url", "must be sqlite:///FILE or postgresql://user:password@host:port/dbname")
        if {"password", "sslpassword"} & set(parse_qs(urlsplit(url).query)):
            # Only the password in the user info is masked and left out where the URL is printed.
            raise self.error("store.url", "give the password as postgresql://user:${VAR}@host/dbname, not as a "
                             "password= or sslpassword= parameter")
        return StoreSettings(url)

    def access(self, raw: object) -> AccessSettings:
        section = self.section(raw, "access", ("allowed_chats", "allowed_users"))
        chats = self.value(section, "allowed_chats", "access", (), _string_list)
        for chat_id in chats:
            if chat_id != "*" and not is_valid_chat_id(chat_id):
                raise self.error("access.allowed_chats", f"{chat_id!r} is not a valid chat id")
        return AccessSettings(
            allowed_chats=chats,
            allowed_users=self.value(section, "allowed_users", "access", (), _string_list),
        )

    def flat(self, raw: object, key: str, cls: type[T], converters: dict[str, Callable[[Any], Any]]) -> T:
        """A section of plain values, one field of `cls` each; strings unless `converters` says otherwise."""
        section = self.section(raw, key, tuple(f.name for f in dataclasses.fields(cls)))  # type: ignore[arg-type]
        values = {name: self.value(section, name, key, None, converters.get(name, _string)) for name in section}
        return cls(**{name: value for name, value in values.items() if value is not None})

    def feishu(self, raw: object) -> FeishuSettings:
        """The feishu section. Webhook mode needs both webhook keys: without them the SDK checks nothing, and
        anyone who can reach the port could post events as any user."""
        settings = self.flat(raw, "feishu", FeishuSettings, {
            "mode": _choice(FEISHU_MODES), "rate_per_chat": _positive_int, "rate_per_app": _positive_int,
            "rate_per_app_minute": _positive_int, "webhook_port": _port, "webhook_max_body": _size(1024),
            "webhook_max_concurrent": _positive_int, "webhook_max_per_client": _positive_int,
            "webhook_timeout": _positive_number,
            "reconnect_after": _positive_number})
        for name in ("encrypt_key", "verification_token"):
            if settings.mode == "webhook" and not getattr(settings, name):
                raise self.error(f"feishu.{name}", "webhook mode needs the Encrypt Key and the Verification Token "
                                 "from the app's event settings (both), so forged events are refused")
        return settings


def _is_postgres_url(url: str) -> bool:
    """postgresql://[user[:password]@]host[:port]/dbname[?libpq parameters]"""
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError unless a number from 0 to 65535
    except ValueError:
        return False
    database = parts.path[1:]
    return parts.scheme in POSTGRES_SCHEMES and bool(parts.hostname) and port != 0 and bool(database) \
        and "/" not in database


def _absolute(path: Path, source: Path) -> Path:
    """A path from the config: relative ones are relative to the config file's folder."""
    return path if path.is_absolute() else (source.parent / path).resolve()


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


# ---- value converters: each raises ValueError with a message for the operator ------------------------


def _string(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{value!r} must be a string")
    return str(value)


def _boolean(value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):  # from ${VAR}
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} must be true or false")
    return value


def _string_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"{value!r} must be a list of strings")
    return tuple(_string(item) for item in value)


def _number(value: Any, whole: bool, minimum: float, problem: str) -> Any:
    """A number (a whole one if `whole`) of at least `minimum`, also from a string, as ${VAR} gives."""
    if isinstance(value, str):
        try:
            value = int(value) if whole else float(value)
        except ValueError:
            raise ValueError(f"{value!r} {problem}") from None
    if isinstance(value, bool) or not isinstance(value, int if whole else int | float) or value < minimum:
        raise ValueError(f"{value!r} {problem}")
    return value


def _open_ids(value: Any) -> tuple[str, ...]:
    ids = _string_list(value)
    for open_id in ids:
        if not _OPEN_ID.fullmatch(open_id):
            raise ValueError(f"{open_id[:80]!r} is not a Feishu open id (ou_...)")
    return ids


def _permission_rules(value: Any) -> tuple[str, ...]:
    rules = _string_list(value)
    for rule in rules:
        if not _PERMISSION_RULE.fullmatch(rule):
            raise ValueError(f"{rule[:80]!r} is not a permission rule (a tool name, or Tool(specifier))")
    return rules


def _positive_number(value: Any) -> float:
    number = float(_number(value, False, 0, "must be a number above 0"))
    if number == 0:
        raise ValueError(f"{value!r} must be a number above 0")
    return number


def _cpus(value: Any) -> float:
    cpus = _positive_number(value)
    if cpus < 0.01:
        raise ValueError(f"{value!r} is below the engine's minimum of 0.01")
    return cpus


def _non_negative_number(value: Any) -> float:
    return float(_number(value, False, 0, "must be a number, 0 or more"))


def _count(value: Any) -> int:
    return int(_number(value, True, 0, "must be a whole number, 0 or more"))


def _positive_int(value: Any) -> int:
    return int(_number(value, True, 1, "must be a whole number above 0"))


def _port(value: Any) -> int:
    port = _positive_int(value)
    if port > 65535:
        raise ValueError(f"{value!r} is not a port number")
    return port


def _listen_address(value: Any) -> str:
    host, _, port = _string(value).rpartition(":")
    if value and not (host.strip("[]") and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{value!r} must be host:port, like 127.0.0.1:9464 or [::1]:9464")
    return str(value)


def _bytes(value: Any) -> int:
    """Bytes from 1073741824, '512m', '2g' or '1.5G' ('2gb', 'lots' and negatives are errors)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.fullmatch(str(value).strip())
        if match is None:
            raise ValueError(f"{value!r} is not a size: use bytes or a number with k, m or g, like 512m or 2g")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size < 0:
        raise ValueError(f"{value!r} must not be negative")
    return size


def _memory(value: Any) -> int:
    size = _bytes(value)
    if size < _MIN_MEMORY:
        raise ValueError(f"{value!r} is below the engine's minimum of 6m")
    return size


def _size(minimum: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        size = _bytes(value)
        if size < minimum:
            raise ValueError(f"{value!r} is below the minimum of {minimum} bytes")
        return size

    return convert


def _network(value: Any) -> str:
    network = _string(value)
    if not network:
        raise ValueError("must name a network: instance, none, or (with unsafe_network) another one")
    return network


def _engine_url(value: Any) -> str:
    url = _string(value)
    if not _ENGINE_URL.fullmatch(url):
        raise ValueError(f"{value!r} must be an engine's address: unix:///path/docker.sock (tcp:// without TLS "
                         "would leave the Swarm's API open, and is refused)")
    return url


def _placement(value: Any) -> Placement:
    """`{constraints: [node.labels.gpu==true], spread: [node.labels.zone], reserve_cpus: 0.5, reserve_memory: 1g}`."""
    if not isinstance(value, dict) or set(value) - {"constraints", "spread", "reserve_cpus", "reserve_memory"}:
        raise ValueError(f"{value!r} must be a mapping of constraints, spread, reserve_cpus and reserve_memory")
    constraints = _string_list(value.get("constraints") or [])
    for constraint in constraints:
        if not _CONSTRAINT.fullmatch(constraint):
            raise ValueError(f"constraint {constraint!r} must be a node attribute (node.labels.NAME, node.hostname, "
                             "node.role, ...), == or !=, and a value, like node.labels.gpu==true")
    spread = _string_list(value.get("spread") or [])
    for attribute in spread:
        if not _SPREAD.fullmatch(attribute):
            raise ValueError(f"spread {attribute!r} must be a node attribute, like node.labels.zone")
    reserve_cpus = value.get("reserve_cpus")
    reserve_memory = value.get("reserve_memory")
    return Placement(constraints=constraints, spread=spread,
                     reserve_cpus=0.0 if reserve_cpus is None else _cpus(reserve_cpus),
                     reserve_memory=0 if reserve_memory is None else _memory(reserve_memory))


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return str(value)

    return convert


def _http_url(value: Any) -> str:
    url = _string(value).rstrip("/")
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url):
        raise ValueError(f"{value!r} must be an http:// or https:// URL")
    return url


def _money(value: Any) -> Decimal:
    """USD, 0 or more, from a number or a string; kept exact (a budget is compared to the cent)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{value!r} must be an amount in USD, like 5 or 2.50")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{value!r} must be an amount in USD, like 5 or 2.50") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{value!r} must be an amount in USD, 0 or more")
    return amount


def _timezone(value: Any) -> str:
    name = _string(value)
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not a known time zone (an IANA name like UTC or Asia/Shanghai)") from None
    return name


def _time_of_day(value: Any) -> str:
    text = _string(value)
    if not _TIME_OF_DAY.fullmatch(text):
        raise ValueError(f"{value!r} must be a time of day, HH:MM or HH:MM:SS (24-hour)")
    return text


def _egress(value: Any) -> Egress:
    """`open`, `none`, or `{allow: [domains]}` (an allowlist replacing the default one)."""
    if value in ("open", "none", "allowlist"):
        return Egress(mode=value) if value != "allowlist" else Egress()
    if not isinstance(value, dict) or set(value) - {"allow"}:
        raise ValueError(f"{value!r} must be open, none, or a mapping with an allow list of domains")
    allow = _string_list(value.get("allow") or [])
    for pattern in allow:
        if not _DOMAIN_PATTERN.fullmatch(pattern) or len(pattern) > 253:
            raise ValueError(f"{pattern!r} is not a domain (like pypi.org) or a *.suffix pattern (like *.example.com),"
                             " in lower case")
    return Egress(mode="allowlist", allow=allow)
