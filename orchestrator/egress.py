"""The egress proxy: how agents on the instance's internal network reach the hosts their chat may reach.

Agents with `egress: {allow: [...]}` sit on `<instance>-agents`, an internal network with no route out; the one
thing on it they can connect to is the instance's proxy (`<instance>-egress-proxy`, squid from Debian, in this
image), which is also on `<instance>-egress`, a bridge that goes out (closed by the firewall to the host and to
private addresses). Squid allows plain HTTP (to any port) and CONNECT to port 443 only to the domains of the
chat's policy, and only for proxy users whose password checks out.

- A policy is one distinct allowlist (the defaults' and each group's), named by a hash of its domains.
- A chat's proxy user is `<policy>.<chat_id>`; its password an HMAC of that name under the proxy's own key
  (derived from the instance's secret: squid holds this key, never the secret that makes the chats' model tokens).
  So the user name says which policy applies, and a chat cannot claim another chat's or another policy's name.
- Squid checks passwords with `python -m orchestrator.egress <key file>` (a basic-auth helper, `main` below).
- Squid logs only refusals (403: not on the policy; 407 with a user name: bad credentials) to
  `<data_dir>/egress/log/refused.log`; the orchestrator reads it with bounds (`RefusalLog`), logs and counts each.

runtime: swarm: a chat's task may run on any node, so the proxy runs on every node (a global service, on the node's
network, listening on its loopback only: `runtime.egress_proxy_spec`, `egress_node`), and a chat reaches its own
node's through the model gateway there, which serves a second socket in the chat's folder (`EGRESS_SOCKET`) and
relays it to the proxy's port; the agent's container serves that socket on its own 127.0.0.1:PROXY_PORT
(agent-init), so HTTP(S)_PROXY is on its loopback. The credentials are the same. The node's guard closes the
proxy's way out (`firewall.node_proxy_rules`: not the node itself, not private or link-local addresses); each
node's proxy logs its refusals in a folder of its own under the log folder (`NodeRefusalLogs`).

Pure but for writing the proxy's files and reading its log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import hmac
import os
import re
import stat
import sys
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from orchestrator import credentials, untrusted
from orchestrator.config import INSTANCE_NETWORK, ChatOptions, ChatSettings, Egress, Settings

PROXY_PORT = 3128
PROXY_UID = 13  # Debian's `proxy` user and group (base-passwd: the same on every Debian), squid's effective user
CONF_PATH = "/etc/egress"  # in the proxy's container: this module's config folder, read-only
LOG_PATH = "/var/log/egress"  # in the proxy's container: where squid writes the refusals, the only folder it writes
LOG_NAME = "refused.log"
KEY_NAME = "key"
CONFIG_NAME = "squid.conf"
# The helper runs in the proxy's container (the orchestrator's image: its virtualenv), isolated from PYTHON* variables
# and the working folder. Through env: squid starts helpers with argv[0] = "(python)", from which Python cannot find
# its virtualenv (No module named 'orchestrator'); env runs it with its real path.
HELPER = ("/usr/bin/env", "/opt/orchestrator/bin/python", "-I", "-m", "orchestrator.egress")
NO_PROXY = "127.0.0.1,localhost"  # the model gateway, on the agent's loopback
EGRESS_SOCKET = "egress.sock"  # runtime: swarm: in the chat's socket folder, relayed to its node's proxy
PROXIED_MARKER = "egress"  # in the chat's run folder (root's) while its egress is an allowlist: the relay serves it
MAX_CONNECTIONS = 256  # at once from one chat's container (one address): no chat takes all of squid's files
MAX_READ = 1024**2  # bytes of the refusal log read per pass; the rest waits for the next
MAX_LINE = 2048  # a refusal line is about 100 bytes; anything longer is skipped
MAX_NODES = 256  # runtime: swarm: nodes' refusal logs followed at most (a folder each, which any node's proxy can make)
TRUNCATE_AT = 4 * 1024**2  # the log, once read to its end past this size, is emptied (squid appends: O_APPEND)
_DOMAIN = re.compile(r"(\*\.)?[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")
_HOST = re.compile(r"[A-Za-z0-9.:_\[\]-]{1,255}")  # a domain, an IPv4 or a bracketed IPv6 address
NODE_ID = re.compile(r"[a-z0-9]{25}")  # a Swarm node's id, as the engine makes them
_USER = re.compile(r"(p[0-9a-f]{12})\.([A-Za-z0-9][A-Za-z0-9_-]{0,63})")


@dataclass(frozen=True)
class Policy:
    """One allowlist, as squid sees it: `*.suffix` becomes `.suffix` (the domain and its subdomains), and a name
    covered by another entry is dropped (squid refuses to start on overlapping entries)."""

    domains: tuple[str, ...]  # sorted, in squid's notation

    @property
    def name(self) -> str:
        return "p" + hashlib.sha256("\n".join(self.domains).encode()).hexdigest()[:12]


def policy(egress: Egress) -> Policy:
    """The policy of an allowlist; every entry validated again (the config text is built from it). Pure."""
    for domain in egress.allow:
        if not _DOMAIN.fullmatch(domain) or len(domain) > 253:
            raise ValueError(f"{domain!r} is not a domain or a *.suffix pattern")
    entries = {"." + domain[2:] if domain.startswith("*.") else domain for domain in egress.allow}
    wildcards = {entry for entry in entries if entry.startswith(".")}
    return Policy(tuple(sorted(entry for entry in entries if not _covered(entry, wildcards))))


def _covered(entry: str, wildcards: set[str]) -> bool:
    """Whether another wildcard (`.suffix`) matches everything `entry` matches."""
    bare = entry.lstrip(".")
    return any(wildcard != entry and (bare == wildcard[1:] or bare.endswith(wildcard)) for wildcard in wildcards)


def proxied(options: ChatOptions) -> bool:
    """Whether the chat goes out through the proxy: the instance network with an allowlist."""
    return options.network == INSTANCE_NETWORK and options.egress.mode == "allowlist"


def goes_out(options: ChatOptions) -> bool:
    """Whether the chat has its own way out: the instance network with egress open (closed to private addresses and
    the host by the firewall)."""
    return options.network == INSTANCE_NETWORK and options.egress.mode == "open"


def _all_options(settings: Settings) -> list[ChatOptions]:
    """The defaults' and every group's options. Pure."""
    return [settings.defaults, *(dataclasses.replace(settings.defaults, **group) for group in settings.groups.values())]


def policies(settings: Settings) -> list[Policy]:
    """The distinct policies of the defaults and every group that uses the proxy, by name. Pure."""
    found = {p.name: p for p in (policy(o.egress) for o in _all_options(settings) if proxied(o))}
    return [found[name] for name in sorted(found)]


def any_goes_out(settings: Settings) -> bool:
    """Whether some chat's egress is open (runtime: swarm then keeps a network for it on every node). Pure."""
    return any(goes_out(options) for options in _all_options(settings))


def proxy_name(instance: str) -> str:
    """The proxy's container name, which agents resolve on their network."""
    return f"{instance}-egress-proxy"


def proxy_key(secret: bytes) -> bytes:
    """The proxy's own key, derived from the instance's secret: what squid's helper holds."""
    return hmac.new(secret, b"egress proxy key", hashlib.sha256).digest()


def proxy_username(chat_id: str, chat_policy: Policy) -> str:
    return f"{chat_policy.name}.{chat_id}"


def proxy_environment(settings: Settings, chat: ChatSettings, secret: bytes) -> dict[str, str]:
    """HTTP(S)_PROXY with the chat's credentials, for a chat on the proxy; nothing for `open`, `none` or a network
    of the operator's. On Swarm the proxy is on the agent's loopback (EGRESS_RELAY_PORT: agent-init relays it to
    the chat's socket). Pure."""
    if not proxied(chat.options):
        return {}
    username = proxy_username(chat.chat_id, policy(chat.options.egress))
    password = credentials.proxy_password(proxy_key(secret), username)
    relayed = settings.runtime == "swarm"
    url = f"http://{username}:{password}@{'127.0.0.1' if relayed else proxy_name(settings.instance)}:{PROXY_PORT}"
    relay = {"EGRESS_RELAY_PORT": str(PROXY_PORT)} if relayed else {}
    return {"HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url, "https_proxy": url,
            "NO_PROXY": NO_PROXY, "no_proxy": NO_PROXY, **relay}


def node_port(settings: Settings) -> int | None:
    """runtime: swarm: the port of the proxy on each node's loopback, when some chat's egress is an allowlist (the
    model gateway relays the chats' sockets to it); None otherwise."""
    return settings.swarm.egress_port if settings.runtime == "swarm" and policies(settings) else None


def squid_config(chat_policies: Iterable[Policy], on_node: int | None = None) -> str:
    """squid.conf for these policies: listening on PROXY_PORT in its container, or (runtime: swarm) `on_node`, the
    node's loopback port that the model gateway relays the chats' sockets to. Pure."""
    # Per chat: each chat's container is one client address on one host; on a node every relayed connection comes
    # from the loopback, and the gateway holds each chat to its own share instead (gateway.MAX_RELAYED_PER_CHAT).
    per_client = [f"acl too_many maxconn {MAX_CONNECTIONS}", "http_access deny too_many"] if on_node is None else []
    lines = [
        "# Made by the orchestrator from its config at every start (orchestrator/egress.py); edits are lost.",
        f"http_port {PROXY_PORT}" if on_node is None else f"http_port 127.0.0.1:{on_node}",
        "visible_hostname egress-proxy",
        "cache_effective_user proxy",
        "pid_filename none",
        "cache_log stdio:/dev/stderr",
        "coredump_dir /tmp",
        "pinger_enable off",
        "shutdown_lifetime 1 seconds",
        "# A proxy, not a cache; nothing about the agent leaves in headers.",
        "cache deny all",
        "cache_mem 0 MB",
        "forwarded_for delete",
        "via off",
        "httpd_suppress_version_string on",
        "# Only refusals are logged: 403 (not allowed) and 407 (no or bad credentials).",
        "logformat refused %ts %>Hs %>rm %>rd %>rP %un",
        "acl refused http_status 403 407",
        f"access_log stdio:{LOG_PATH}/{LOG_NAME} logformat=refused refused",
        "logfile_rotate 0",
        f"auth_param basic program {' '.join(HELPER)} {CONF_PATH}/{KEY_NAME}",
        # A flood of bad credentials queues for the helpers: past the queue, answered as failed (squid's default
        # for a queue overloaded for minutes is to stop, which would leave every chat of its host without egress).
        "auth_param basic children 4 startup=1 idle=1 queue-size=64 on-persistent-overload=ERR",
        "auth_param basic realm egress",
        "auth_param basic credentialsttl 1 hour",
        "auth_param basic casesensitive on",
        "acl authenticated proxy_auth REQUIRED",
        "acl CONNECT method CONNECT",
        "acl tls_port port 443",
        "acl link_local dst 169.254.0.0/16",
        "http_access deny !authenticated",
        "http_access deny CONNECT !tls_port",
        *per_client,
    ]
    for chat_policy in chat_policies:
        if not chat_policy.domains:
            continue  # an empty allowlist: its users match no allow line
        name = chat_policy.name
        lines.append(f"acl user_{name} proxy_auth_regex ^{name}\\.")
        for domain in chat_policy.domains:
            if not re.fullmatch(r"\.?[a-z0-9.-]+", domain):  # never a space or a newline in the config
                raise ValueError(f"{domain!r} is not a domain")
            lines.append(f"acl allow_{name} dstdomain -n {domain}")
        # Not to the proxy's own loopback or the metadata service even when a listed name resolves there; private
        # addresses are closed by the firewall on the egress network.
        lines.append(f"http_access allow user_{name} allow_{name} !to_localhost !link_local")
    lines.append("http_access deny all")
    return "\n".join(lines) + "\n"


# ---- the proxy's files on the host ----


def folder(settings: Settings) -> Path:
    """<data_dir>/egress: root's. conf/ (mounted read-only) holds squid.conf and the key; log/ (squid's) the log."""
    return settings.data_dir / "egress"


def conf_dir(settings: Settings) -> Path:
    return folder(settings) / "conf"


def log_dir(settings: Settings) -> Path:
    return folder(settings) / "log"


def write_files(settings: Settings, secret: bytes) -> str:
    """The proxy's config and key, replaced whole (a helper starting meanwhile reads the old or the new one), and its
    log folder; a digest of both, which changes the proxy's container spec when they change."""
    config = squid_config(policies(settings), node_port(settings))
    key = proxy_key(secret).hex()
    for path, mode in ((folder(settings), 0o755), (conf_dir(settings), 0o755)):
        path.mkdir(mode=mode, exist_ok=True)
        os.chmod(path, mode, follow_symlinks=False)
    _replace(conf_dir(settings) / CONFIG_NAME, config, 0o644, group=None)
    _replace(conf_dir(settings) / KEY_NAME, key + "\n", 0o640, group=PROXY_UID)  # squid's helpers read it
    logs = log_dir(settings)
    logs.mkdir(mode=0o750, exist_ok=True)
    os.chown(logs, PROXY_UID, PROXY_UID, follow_symlinks=False)
    return hashlib.sha256(f"{config}\0{key}".encode()).hexdigest()[:16]


def _replace(path: Path, text: str, mode: int, group: int | None) -> None:
    temporary = path.with_name(f".{path.name}.new")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if group is not None:
            os.fchown(fd, 0, group)
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(temporary, path)


# ---- the refusals ----


@dataclass(frozen=True)
class Refusal:
    chat_id: str  # "-" when the credentials were bad: the user name is the client's claim, not a chat
    method: str
    host: str
    port: str
    reason: str


def parse_refusal(line: str) -> Refusal | None:
    """One line of the refusal log (`logformat refused`), or None for a challenge without credentials (a client
    that sends them once asked) or a line of another shape. Pure."""
    fields = line.split(" ", 5)
    if len(fields) != 6:
        return None
    _, status, method, host, port, user = fields
    host = host if _HOST.fullmatch(host) else untrusted.excerpt(host, 80)
    method, port = untrusted.excerpt(method, 20), untrusted.excerpt(port, 8)
    if status == "403":
        match = _USER.fullmatch(user)
        return Refusal(match.group(2) if match else "-", method, host, port, "not allowed by the chat's egress policy")
    if status == "407" and user != "-":
        return Refusal("-", method, host, port, f"bad proxy credentials for user {untrusted.excerpt(user, 80)}")
    return None


class RefusalLog:
    """Follows squid's refusal log: what was added since the last pass, at most MAX_READ bytes a pass. Starts where
    the log ends when it is made (what an earlier run of the orchestrator read is not reported again). Squid writes
    with O_APPEND, so the log, read to its end past TRUNCATE_AT, is emptied in place: a line written between the
    last read and the truncation (a few microseconds) goes unreported. Squid's folder is not the agents', but the
    file is still opened without following links and read with bounds."""

    def __init__(self, folder_path: Path, from_start: bool = False) -> None:
        self.folder = folder_path
        self.problems: dict[str, str] = {}  # as NodeRefusalLogs'; one log that cannot be read raises instead
        with self._open() as fd:
            self.offset = 0 if fd is None or from_start else os.fstat(fd).st_size

    def read(self) -> list[Refusal]:
        with self._open() as fd:
            if fd is None:
                return []
            size = os.fstat(fd).st_size
            if size < self.offset:  # emptied or replaced since
                self.offset = 0
            data = os.pread(fd, min(MAX_READ, size - self.offset), self.offset)
            lines, consumed = _complete_lines(data, whole=len(data) >= MAX_READ)
            self.offset += consumed
            if self.offset >= TRUNCATE_AT and os.fstat(fd).st_size == self.offset:
                os.ftruncate(fd, 0)
                self.offset = 0
        return [refusal for refusal in map(parse_refusal, lines) if refusal is not None]

    @contextlib.contextmanager
    def _open(self) -> Iterator[int | None]:
        """The log, read-write (to empty it), a regular file and not a link; None while there is none."""
        try:
            with untrusted.directory(self.folder) as parent:
                fd = os.open(LOG_NAME, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
        except FileNotFoundError:
            yield None
            return
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO):
                raise untrusted.Refused(f"{self.folder / LOG_NAME}: {os.strerror(exc.errno)}") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise untrusted.Refused(f"{self.folder / LOG_NAME}: not a regular file")
            yield fd
        finally:
            os.close(fd)


class NodeRefusalLogs:
    """runtime: swarm: the refusal logs of every node's proxy, each in a folder of its own under the log folder
    (named by the node's id: `egress_node`), found as they appear, at most MAX_NODES. Those there at the start are
    followed from their end, as one host's; a node's that appears later from its start (its proxy began writing
    since). Every node's proxy can write the whole folder, so a node's log that cannot be read (a link, a FIFO, a
    folder swapped for a link) is skipped, said once in `problems`, and the others are read on."""

    def __init__(self, folder_path: Path) -> None:
        self.folder = folder_path
        self.logs: dict[str, RefusalLog] = {}
        self.problems: dict[str, str] = {}  # node folder → what is wrong with it now
        self._follow(self._nodes(), from_start=False)

    def read(self) -> list[Refusal]:
        self._follow(self._nodes() - self.logs.keys(), from_start=True)
        refusals = []
        for name, log in self.logs.items():
            try:
                refusals += log.read()
                self.problems.pop(name, None)
            except (untrusted.Refused, OSError) as exc:
                self.problems[name] = str(exc)
        return refusals

    def _follow(self, names: set[str], from_start: bool) -> None:
        for name in sorted(names)[:max(0, MAX_NODES - len(self.logs))]:
            try:
                self.logs[name] = RefusalLog(self.folder / name, from_start)
            except (untrusted.Refused, OSError) as exc:
                self.problems[name] = str(exc)

    def _nodes(self) -> set[str]:
        try:
            with os.scandir(self.folder) as entries:
                return {entry.name for entry in entries
                        if NODE_ID.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)}
        except FileNotFoundError:
            return set()


def refusal_logs(settings: Settings) -> RefusalLog | NodeRefusalLogs:
    return NodeRefusalLogs(log_dir(settings)) if settings.runtime == "swarm" else RefusalLog(log_dir(settings))


def _complete_lines(data: bytes, whole: bool) -> tuple[list[str], int]:
    """The complete lines of `data` and how many bytes they take; lines over MAX_LINE skipped. A last line without
    its newline waits for the next pass, unless the read was full and it alone fills it (then it is skipped)."""
    end = data.rfind(b"\n") + 1
    if end == 0 and whole:
        return [], len(data)
    lines = [line.decode(errors="replace") for line in data[:end].split(b"\n")[:-1] if len(line) <= MAX_LINE]
    return lines, end


# ---- squid's basic-auth helper ----


def check(key: bytes, request: str) -> bool:
    """One helper request, `user password` (each URL-encoded by squid): whether the password is the user's."""
    fields = request.strip("\n").split(" ")
    if len(fields) != 2:
        return False
    username, password = (urllib.parse.unquote(field) for field in fields)
    if not _USER.fullmatch(username):
        return False
    return credentials.matches(credentials.proxy_password(key, username), password)


def main(argv: list[str]) -> int:
    """`python -m orchestrator.egress KEY_FILE`: answers squid's requests on stdin, one `OK` or `ERR` a line."""
    if len(argv) != 2:
        print("usage: python -m orchestrator.egress KEY_FILE", file=sys.stderr)
        return 2
    key = bytes.fromhex(Path(argv[1]).read_text().strip())
    if len(key) != credentials.SECRET_BYTES:
        print(f"{argv[1]} does not hold a key of {credentials.SECRET_BYTES} bytes", file=sys.stderr)
        return 2
    for request in sys.stdin:
        sys.stdout.write("OK\n" if check(key, request) else "ERR\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
