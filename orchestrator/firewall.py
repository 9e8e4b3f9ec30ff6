"""The host's firewall rules that close the instance's networks (iptables; the only module that runs it).

The instance has two bridges (see `runtime`):
- the agents' network (internal: the engine gives it no route out). From it, only the egress proxy's port on the
  proxy's address is let through (ACCEPT: the bridge is made with enable_icc=false, so the engine drops all
  container-to-container traffic, the agents' to the proxy too), and its answers; anything else is rejected.
- the egress network (the proxy's way out, and that of chats with `egress: open`): the internet, but not
  link-local addresses (169.254.0.0/16: the cloud metadata service), private and shared ranges (the LAN, the
  cloud's VPC, other Docker networks and their published ports, which DNAT into them), loopback, multicast. The
  one exception is DNS to the host's own resolvers, which are often private addresses.
From neither does anything reach the host itself, on any of its addresses (INPUT: the webhook, metrics, every
local service).

The rules live in three chains of their own per instance, re-made at every start, so the result is the same
whatever was there before; the jumps to them are added once.
"""

from __future__ import annotations

import hashlib
import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from orchestrator.egress import PROXY_PORT

BLOCKED_RANGES = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
                  "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4")
# Where the engine finds the resolvers its embedded DNS forwards to: systemd-resolved's upstream list when the
# host runs it (/etc/resolv.conf then names only 127.0.0.53), else /etc/resolv.conf.
RESOLV_CONFS = (Path("/run/systemd/resolve/resolv.conf"), Path("/etc/resolv.conf"))


class FirewallError(Exception):
    """The rules could not be installed; worded for the operator."""


@dataclass(frozen=True)
class Chains:
    forward: str  # traffic from the egress bridge leaving through the host (jumped to from DOCKER-USER)
    agents: str  # traffic from the agents' bridge through the host: to the proxy only (from DOCKER-USER)
    local: str  # traffic from either bridge to the host itself (jumped to from INPUT)


@dataclass(frozen=True)
class Bridges:
    agents: str
    egress: str


def chains(instance: str) -> Chains:
    digest = hashlib.sha256(instance.encode()).hexdigest()[:10]
    return Chains(forward=f"ORCH-{digest}-FWD", agents=f"ORCH-{digest}-AGT", local=f"ORCH-{digest}-IN")


def host_resolvers(resolv_conf: str) -> list[str]:
    """The IPv4 nameservers of a resolv.conf that are not loopback (Docker replaces those with public ones)."""
    resolvers = []
    for line in resolv_conf.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                address = ipaddress.ip_address(words[1])
            except ValueError:
                continue
            if address.version == 4 and not address.is_loopback:
                resolvers.append(str(address))
    return resolvers


# Rules are written as `iptables -S` prints them back, so a check can compare them as text.
ANSWERS = ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"]


def _resolvers() -> list[str]:
    for path in RESOLV_CONFS:
        if path.exists():
            return host_resolvers(path.read_text())
    return []


def forward_rules(resolvers: list[str]) -> list[list[str]]:
    """The forward chain's rules, in order. Pure."""
    rules = [ANSWERS]
    for resolver in resolvers:
        rules += [["-d", f"{resolver}/32", "-p", protocol, "-m", protocol, "--dport", "53", "-j", "RETURN"]
                  for protocol in ("udp", "tcp")]
    rules += [["-d", blocked, "-j", "REJECT", "--reject-with", "icmp-net-prohibited"] for blocked in BLOCKED_RANGES]
    return rules


def agents_rules(proxy: str | None) -> list[list[str]]:
    """The agents' chain: to the proxy's port at its address (when it runs) and its answers back, nothing else.
    Pure."""
    through = [] if proxy is None else [
        ["-s", f"{proxy}/32", "-p", "tcp", "-m", "tcp", "--sport", str(PROXY_PORT),
         "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"],
        ["-d", f"{proxy}/32", "-p", "tcp", "-m", "tcp", "--dport", str(PROXY_PORT), "-j", "ACCEPT"]]
    return [*through, ["-j", "REJECT", "--reject-with", "icmp-net-prohibited"]]


def local_rules() -> list[list[str]]:
    """The host chain's rules: answers to what the host started, nothing else. Pure."""
    return [ANSWERS, ["-j", "REJECT", "--reject-with", "icmp-host-prohibited"]]


def _chain_rules(names: Chains, proxy: str | None) -> list[tuple[str, list[list[str]]]]:
    return [(names.forward, forward_rules(_resolvers())), (names.agents, agents_rules(proxy)),
            (names.local, local_rules())]


def _jumps(names: Chains, bridges: Bridges) -> list[tuple[str, list[str]]]:
    return [("DOCKER-USER", ["-i", bridges.egress, "-j", names.forward]),
            ("DOCKER-USER", ["-i", bridges.agents, "-j", names.agents]),
            ("INPUT", ["-i", bridges.egress, "-j", names.local]),
            ("INPUT", ["-i", bridges.agents, "-j", names.local])]


def install(instance: str, bridges: Bridges, proxy: str | None) -> Chains:
    """Make (or re-make) the instance's chains and jump to them from DOCKER-USER and INPUT for its bridges.
    `proxy`: the egress proxy's address on the agents' network (None: it does not run)."""
    names = chains(instance)
    for chain, rules in _chain_rules(names, proxy):
        _ensure_chain(chain)
        _iptables("-F", chain)
        for rule in rules:
            _iptables("-A", chain, *rule)
    for parent, rule in _jumps(names, bridges):
        _ensure_jump(parent, rule)
    _delete_jump("DOCKER-USER", ["-i", bridges.agents, "-j", names.forward])  # an earlier version's, now wrong
    return names


def intact(instance: str, bridges: Bridges, proxy: str | None) -> bool:
    """Whether the instance's chains hold exactly its rules (for this proxy address) and every jump to them is
    in place (a firewall reload or a flush by hand takes them away)."""
    names = chains(instance)
    for chain, rules in _chain_rules(names, proxy):
        if _rules(chain) != [" ".join(["-A", chain, *rule]) for rule in rules]:
            return False
    return all(_succeeds("-C", parent, *rule) for parent, rule in _jumps(names, bridges))


# ---- runtime: swarm: a node's own rules, kept by the instance's guard on every node (orchestrator.node_guard) ----


def node_chain(instance: str) -> str:
    return f"ORCH-{hashlib.sha256(instance.encode()).hexdigest()[:10]}-NODE"


def _node_jumps(instance: str, bridge: str) -> list[tuple[str, list[str]]]:
    """From the chats' bridge to the node itself: to the node's chain (answers to what the node started, nothing
    else). Between two chats on the bridge: dropped, whatever the node's config network says of enable_icc."""
    return [("INPUT", ["-i", bridge, "-j", node_chain(instance)]),
            ("DOCKER-USER", ["-i", bridge, "-o", bridge, "-j", "DROP"])]


def install_node(instance: str, bridge: str) -> None:
    """Make (or re-make) the node's chain and its jumps for the chats' bridge (by name: the rules hold before the
    bridge exists, from the node's first chat on)."""
    chain = node_chain(instance)
    _ensure_chain(chain)
    _iptables("-F", chain)
    for rule in local_rules():
        _iptables("-A", chain, *rule)
    for parent, rule in _node_jumps(instance, bridge):
        _ensure_jump(parent, rule)


def node_intact(instance: str, bridge: str) -> bool:
    chain = node_chain(instance)
    return _rules(chain) == [" ".join(["-A", chain, *rule]) for rule in local_rules()] and all(
        _succeeds("-C", parent, *rule) for parent, rule in _node_jumps(instance, bridge))


def _rules(chain: str) -> list[str]:
    """A chain's rules as `iptables -S` prints them, without its `-N` line; empty when it is missing."""
    run = subprocess.run([*_command(), "-S", chain], capture_output=True, text=True)
    return [line for line in run.stdout.splitlines() if line.startswith("-A ")] if run.returncode == 0 else []


def remove(instance: str, bridges: Bridges) -> None:
    """Take the instance's rules away (tests; an operator retiring an instance)."""
    names = chains(instance)
    for parent, rule in _jumps(names, bridges):
        _delete_jump(parent, rule)
    for chain in (names.forward, names.agents, names.local):
        if _succeeds("-L", chain, "-n"):
            _iptables("-F", chain)
            _iptables("-X", chain)


def _delete_jump(parent: str, rule: list[str]) -> None:
    while _succeeds("-C", parent, *rule):
        _iptables("-D", parent, *rule)


def _ensure_chain(chain: str) -> None:
    if not _succeeds("-L", chain, "-n"):
        _iptables("-N", chain)


def _ensure_jump(parent: str, rule: list[str]) -> None:
    if not _succeeds("-L", parent, "-n"):
        raise FirewallError(f"the {parent} chain is missing: is the Docker engine running with its iptables "
                            "rules (the default)?")
    if not _succeeds("-C", parent, *rule):
        _iptables("-I", parent, "1", *rule)


def _command() -> list[str]:
    iptables = shutil.which("iptables")
    if iptables is None:
        raise FirewallError("iptables is not installed; the instance network cannot be closed without it")
    return [iptables, "-w", "10"]


def _succeeds(*args: str) -> bool:
    return subprocess.run([*_command(), *args], capture_output=True).returncode == 0


def _iptables(*args: str) -> None:
    run = subprocess.run([*_command(), *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise FirewallError(f"iptables {' '.join(args)} failed: {run.stderr.strip()} (the orchestrator needs root, "
                            "or CAP_NET_ADMIN in the host's network namespace, to close the instance network)")
