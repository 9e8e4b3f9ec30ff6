"""The host's firewall rules that close the instance network (iptables; the only module that runs it).

Agents on the instance's bridge may reach the internet (an allowlisting proxy comes later), but not:
- the host itself, on any of its addresses (INPUT from the bridge: the webhook, metrics, every local service);
- link-local addresses (169.254.0.0/16: the cloud metadata service), private and shared ranges (the LAN, the
  cloud's VPC, other Docker networks and their published ports, which DNAT into them), loopback, multicast;
- each other: the bridge is made with enable_icc=false, so the engine drops container-to-container traffic.
The one exception is DNS to the host's own resolvers, which are often private addresses.

The rules live in two chains of their own per instance, re-made at every start, so the result is the same
whatever was there before; the jumps to them are added once.
"""

from __future__ import annotations

import hashlib
import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

BLOCKED_RANGES = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
                  "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4")
# Where the engine finds the resolvers its embedded DNS forwards to: systemd-resolved's upstream list when the
# host runs it (/etc/resolv.conf then names only 127.0.0.53), else /etc/resolv.conf.
RESOLV_CONFS = (Path("/run/systemd/resolve/resolv.conf"), Path("/etc/resolv.conf"))


class FirewallError(Exception):
    """The rules could not be installed; worded for the operator."""


@dataclass(frozen=True)
class Chains:
    forward: str  # traffic from the bridge leaving through the host (jumped to from DOCKER-USER)
    local: str  # traffic from the bridge to the host itself (jumped to from INPUT)


def chains(instance: str) -> Chains:
    digest = hashlib.sha256(instance.encode()).hexdigest()[:10]
    return Chains(forward=f"ORCH-{digest}-FWD", local=f"ORCH-{digest}-IN")


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


def local_rules() -> list[list[str]]:
    """The host chain's rules: answers to what the host started, nothing else. Pure."""
    return [ANSWERS, ["-j", "REJECT", "--reject-with", "icmp-host-prohibited"]]


def install(instance: str, bridge: str) -> Chains:
    """Make (or re-make) the instance's chains and jump to them from DOCKER-USER and INPUT for its bridge."""
    names = chains(instance)
    resolvers = _resolvers()
    for chain, rules in ((names.forward, forward_rules(resolvers)), (names.local, local_rules())):
        _ensure_chain(chain)
        _iptables("-F", chain)
        for rule in rules:
            _iptables("-A", chain, *rule)
    _ensure_jump("DOCKER-USER", ["-i", bridge, "-j", names.forward])
    _ensure_jump("INPUT", ["-i", bridge, "-j", names.local])
    return names


def intact(instance: str, bridge: str) -> bool:
    """Whether the instance's chains hold exactly its rules and both jumps to them are in place (a firewall
    reload or a flush by hand takes them away)."""
    names = chains(instance)
    resolvers = _resolvers()
    for chain, rules in ((names.forward, forward_rules(resolvers)), (names.local, local_rules())):
        if _rules(chain) != [" ".join(["-A", chain, *rule]) for rule in rules]:
            return False
    return (_succeeds("-C", "DOCKER-USER", "-i", bridge, "-j", names.forward)
            and _succeeds("-C", "INPUT", "-i", bridge, "-j", names.local))


def _rules(chain: str) -> list[str]:
    """A chain's rules as `iptables -S` prints them, without its `-N` line; empty when it is missing."""
    run = subprocess.run([*_command(), "-S", chain], capture_output=True, text=True)
    return [line for line in run.stdout.splitlines() if line.startswith("-A ")] if run.returncode == 0 else []


def remove(instance: str, bridge: str) -> None:
    """Take the instance's rules away (tests; an operator retiring an instance)."""
    names = chains(instance)
    for parent, chain in (("DOCKER-USER", names.forward), ("INPUT", names.local)):
        while _succeeds("-C", parent, "-i", bridge, "-j", chain):
            _iptables("-D", parent, "-i", bridge, "-j", chain)
        if _succeeds("-L", chain, "-n"):
            _iptables("-F", chain)
            _iptables("-X", chain)


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
