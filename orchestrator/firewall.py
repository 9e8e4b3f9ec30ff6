"""The host's firewall rules that close the instance's networks (iptables; the only module that runs it).

The instance has two bridges (see `runtime`):
- the agents' network (internal: the engine gives it no route out). From it, only the egress proxy's port on the
  proxy's address is let through (ACCEPT: the bridge is made with enable_icc=false, so the engine drops all
  container-to-container traffic, the agents' to the proxy too), and its answers; anything else is rejected.
- the egress network (the proxy's way out, and that of chats with `egress: open`): the internet, but not
  link-local addresses (169.254.0.0/16: the cloud metadata service), private and shared ranges (the LAN, the
  cloud's VPC, other Docker networks and their published ports, which DNAT into them), loopback, multicast, nor
  Docker Swarm's ports anywhere. The one exception is DNS to the host's own resolvers, which are often private
  addresses.
From neither does anything reach the host itself, on any of its addresses (INPUT: the webhook, metrics, every
local service).

On runtime: swarm each node's guard (orchestrator.node_guard) keeps the node's own chains instead (`install_node`):
the chats' bridge and, while there is one, the open chats' bridge closed to the node and between chats, the open
one's way out closed as the egress bridge's above, and the egress proxy's way out (by its uid).

The rules live in three chains of their own per instance, re-made at every start, so the result is the same
whatever was there before. The jumps to them come first in their parent chains and are put back first when a rule
that could let a packet through before them (an operator's ACCEPT, a firewall manager's chain reloaded above them)
was inserted above; chains and jumps change in one iptables-restore, atomically, so no packet meets a chain half
made or a jump missing.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.egress import PROXY_PORT, PROXY_UID

BLOCKED_RANGES = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
                  "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4")
# Swarm's own ports (its defaults), closed on every IPv4 address, public ones too: the managers' API (2377/tcp), the
# nodes' gossip (7946/tcp and udp) and the overlay networks' VXLAN (4789/udp), which has no authentication: a
# datagram that reaches a node's 4789 lands in whichever overlay network its VXLAN id names. Docker advises keeping
# them on a private network (closed to the chats by BLOCKED_RANGES); this holds where a Swarm, ours or another, was
# not set up so. No chat needs them. A Swarm made with other ports (`--data-path-port`, `--listen-addr`) is not
# covered: docs/SCALING.md.
SWARM_PORTS = (("tcp", 2377), ("tcp", 7946), ("udp", 7946), ("udp", 4789))
# Where the engine finds the resolvers its embedded DNS forwards to: systemd-resolved's upstream list when the
# host runs it (/etc/resolv.conf then names only 127.0.0.53), else /etc/resolv.conf.
RESOLV_CONFS = (Path("/run/systemd/resolve/resolv.conf"), Path("/etc/resolv.conf"))
# What may come before an instance's jump in its parent chain: another instance's jump (it matches that instance's
# bridges only), a drop or a reject, a target that lets the packet go on down the chain (a log, a mark). Anything
# else (ACCEPT, RETURN, a jump to a firewall manager's chain) could let a chat's packet through before the jump.
HARMLESS_ABOVE = re.compile(r" -j (ORCH-\S+|DROP|REJECT|LOG|NFLOG|MARK|CONNMARK)( |$)")
NEEDS = (" (the orchestrator needs root, or CAP_NET_ADMIN in the host's network namespace, to close the instance "
         "network)")


Jump = tuple[str, list[str]]  # a parent chain and a rule in it


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


def host_resolvers(resolv_conf: str, loopback: bool = False) -> list[str]:
    """The IPv4 nameservers of a resolv.conf, but for loopback ones (Docker replaces those with public ones in a
    container of its own network) unless `loopback` (what a process on the host's network asks)."""
    resolvers = []
    for line in resolv_conf.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                address = ipaddress.ip_address(words[1])
            except ValueError:
                continue
            if address.version == 4 and (loopback or not address.is_loopback):
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
    """The forward chain's rules, in order: answers, DNS to the host's resolvers, then no private range and no Swarm
    port anywhere. Pure."""
    rules = [ANSWERS]
    for resolver in resolvers:
        rules += [["-d", f"{resolver}/32", "-p", protocol, "-m", protocol, "--dport", "53", "-j", "RETURN"]
                  for protocol in ("udp", "tcp")]
    rules += [["-d", blocked, "-j", "REJECT", "--reject-with", "icmp-net-prohibited"] for blocked in BLOCKED_RANGES]
    return rules + swarm_port_rules(("tcp", "udp"))


def swarm_port_rules(protocols: tuple[str, ...]) -> list[list[str]]:
    """Swarm's ports of these protocols rejected, whatever the address. Pure."""
    return [["-p", protocol, "-m", protocol, "--dport", str(port), "-j", "REJECT", "--reject-with",
             "icmp-net-prohibited"] for protocol, port in SWARM_PORTS if protocol in protocols]


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


def _jumps(names: Chains, bridges: Bridges) -> list[Jump]:
    return [("DOCKER-USER", ["-i", bridges.egress, "-j", names.forward]),
            ("DOCKER-USER", ["-i", bridges.agents, "-j", names.agents]),
            ("INPUT", ["-i", bridges.egress, "-j", names.local]),
            ("INPUT", ["-i", bridges.agents, "-j", names.local])]


def install(instance: str, bridges: Bridges, proxy: str | None) -> Chains:
    """Make (or re-make) the instance's chains and jump to them from DOCKER-USER and INPUT for its bridges.
    `proxy`: the egress proxy's address on the agents' network (None: it does not run)."""
    names = chains(instance)
    _apply(_chain_rules(names, proxy), _jumps(names, bridges),
           stale=[("DOCKER-USER", ["-i", bridges.agents, "-j", names.forward])])  # an earlier version's, now wrong
    return names


def intact(instance: str, bridges: Bridges, proxy: str | None) -> bool:
    """Whether the instance's chains hold exactly its rules (for this proxy address) and every jump to them is
    in place (a firewall reload or a flush by hand takes them away)."""
    names = chains(instance)
    return _intact(_chain_rules(names, proxy), _jumps(names, bridges))


# ---- runtime: swarm: a node's own rules, kept by the instance's guard on every node (orchestrator.node_guard) ----


def node_chain(instance: str) -> str:
    return f"ORCH-{hashlib.sha256(instance.encode()).hexdigest()[:10]}-NODE"


def node_proxy_chain(instance: str) -> str:
    return f"ORCH-{hashlib.sha256(instance.encode()).hexdigest()[:10]}-PRX"


def node_out_chain(instance: str) -> str:
    """The way out of the open chats' bridge on a node: `forward_rules`, as one host's egress bridge."""
    return f"ORCH-{hashlib.sha256(instance.encode()).hexdigest()[:10]}-OUT"


def node_proxy_rules(resolvers: list[str]) -> list[list[str]]:
    """The way out of the instance's egress proxy on a node (on the node's network, as user proxy): answers, DNS
    to the node's resolvers (port 53 as the query was sent: a Docker-in-Docker node's embedded resolver, 127.0.0.11,
    is redirected to another port before these rules see it), then nothing of the node itself (any of its
    addresses), nothing private, link-local or loopback and no Swarm port (TCP's), as `forward_rules` close one
    host's egress bridge. Pure."""
    rules = [ANSWERS]
    for resolver in resolvers:
        rules += [["-p", protocol, "-m", "conntrack", "--ctorigdst", resolver, "--ctorigdstport", "53", "-j", "RETURN"]
                  for protocol in ("udp", "tcp")]
    rules.append(["-m", "addrtype", "--dst-type", "LOCAL", "-j", "REJECT", "--reject-with", "icmp-net-prohibited"])
    rules += [["-d", blocked, "-j", "REJECT", "--reject-with", "icmp-net-prohibited"] for blocked in BLOCKED_RANGES]
    return rules + swarm_port_rules(("tcp",))  # squid connects over TCP only


def _node_resolvers() -> list[str]:
    """The resolvers the proxy asks: the node's resolv.conf as it is (the guard is on the node's network, as the
    proxy is), loopback ones included."""
    path = RESOLV_CONFS[-1]
    return host_resolvers(path.read_text(), loopback=True) if path.exists() else []


# IPv6, where the node has it: the proxy makes no IPv6 connection at all (answers only; squid falls back to IPv4),
# which spares a second list of the node's own and private addresses. The chats' tasks have IPv6 turned off.
NODE_PROXY_RULES_V6 = [ANSWERS, ["-j", "REJECT", "--reject-with", "icmp6-adm-prohibited"]]
IPV6_INTERFACES = Path("/proc/net/if_inet6")  # missing where the kernel (or the node's namespace) has no IPv6


def _node_chain_rules(instance: str, open_bridge: str | None) -> list[tuple[str, list[list[str]]]]:
    chains = [(node_chain(instance), local_rules()), (node_proxy_chain(instance), node_proxy_rules(_node_resolvers()))]
    if open_bridge is not None:  # DNS let out to the non-loopback resolvers the guard sees in the node's resolv.conf:
        # the engine asks those from the chat's side (others, such as systemd-resolved's upstream servers or an
        # engine's own `dns` setting, are not seen here: docs/SCALING.md)
        chains.append((node_out_chain(instance), forward_rules(_resolvers())))
    return chains


def _node_proxy_jump(instance: str) -> Jump:
    return "OUTPUT", ["-m", "owner", "--uid-owner", str(PROXY_UID), "-j", node_proxy_chain(instance)]


# FORWARD's jump to DOCKER-USER, first: an engine puts it there when it makes a network, but after a restart it may
# put Swarm's DOCKER-INGRESS (which accepts the published ports' traffic, whatever its destination) above it.
DOCKER_USER_FIRST: Jump = ("FORWARD", ["-j", "DOCKER-USER"])


def _node_jumps(instance: str, bridge: str, open_bridge: str | None) -> list[Jump]:
    """From the chats' bridges to the node itself: to the node's chain (answers to what the node started, nothing
    else). Between two chats on a bridge: dropped, whatever the node's config network says of enable_icc. From the
    open chats' bridge through the node: to the way-out chain. From the node's processes of Debian's proxy user
    (uid 13, the egress proxy's: on a node of the instance no other proxy should run as it): to the proxy's
    chain. And DOCKER-USER first in FORWARD (`DOCKER_USER_FIRST`)."""
    jumps: list[Jump] = []
    for each in (bridge, *([open_bridge] if open_bridge else [])):
        jumps += [("INPUT", ["-i", each, "-j", node_chain(instance)]),
                  ("DOCKER-USER", ["-i", each, "-o", each, "-j", "DROP"])]
    if open_bridge:
        jumps.append(("DOCKER-USER", ["-i", open_bridge, "-j", node_out_chain(instance)]))
    return [*jumps, _node_proxy_jump(instance), DOCKER_USER_FIRST]


def install_node(instance: str, bridge: str, open_bridge: str | None = None) -> None:
    """Make (or re-make) the node's chains and their jumps for the chats' bridge and the open chats' (by name: the
    rules hold before a bridge exists, from the node's first chat on) and the egress proxy's way out (IPv6's too,
    where there is IPv6)."""
    _apply(_node_chain_rules(instance, open_bridge), _node_jumps(instance, bridge, open_bridge))
    if IPV6_INTERFACES.exists():
        _apply([(node_proxy_chain(instance), NODE_PROXY_RULES_V6)], [_node_proxy_jump(instance)], family=IPV6)


def node_intact(instance: str, bridge: str, open_bridge: str | None = None) -> bool:
    return _intact(_node_chain_rules(instance, open_bridge), _node_jumps(instance, bridge, open_bridge)) and (
        not IPV6_INTERFACES.exists()
        or _intact([(node_proxy_chain(instance), NODE_PROXY_RULES_V6)], [_node_proxy_jump(instance)], family=IPV6))


@dataclass(frozen=True)
class Family:
    tool: str
    restore: str


IPV4, IPV6 = Family("iptables", "iptables-restore"), Family("ip6tables", "ip6tables-restore")


def _apply(chain_rules: list[tuple[str, list[list[str]]]], jumps: list[Jump], stale: Sequence[Jump] = (),
           family: Family = IPV4) -> None:
    """Each chain made (or emptied) with its rules; each jump put first unless it is in place (`_placed`), its other
    copies deleted; every copy of a `stale` rule deleted: in one iptables-restore, which applies all or nothing."""
    for parent in {parent for parent, _ in jumps}:
        if not _succeeds("-L", parent, "-n", family=family):
            raise FirewallError(f"the {parent} chain is missing: is the Docker engine running with its iptables "
                                "rules (the default)?")
    listed = {parent: _rules(parent, must_list=True, family=family) for parent, _ in [*jumps, *stale]}
    batch = []
    for chain, rules in chain_rules:
        batch += [f":{chain} - [0:0]", *(_line("-A", chain, rule) for rule in rules)]
    for parent, rule in jumps:
        if not _placed(parent, rule, listed[parent]):
            batch += [_line("-D", parent, rule)] * listed[parent].count(_line("-A", parent, rule))
            batch.append(_line("-I", parent, ["1", *rule]))
    for parent, rule in stale:
        batch += [_line("-D", parent, rule)] * listed[parent].count(_line("-A", parent, rule))
    _restore(batch, family)


def _intact(chain_rules: list[tuple[str, list[list[str]]]], jumps: list[Jump], family: Family = IPV4) -> bool:
    """Whether each chain holds exactly its rules and each jump is in place (`_placed`): what `_apply` makes."""
    if any(_rules(chain, family=family) != [_line("-A", chain, rule) for rule in rules]
           for chain, rules in chain_rules):
        return False
    listed = {parent: _rules(parent, family=family) for parent, _ in jumps}
    return all(_placed(parent, rule, listed[parent]) for parent, rule in jumps)


def _placed(parent: str, rule: list[str], listed: list[str]) -> bool:
    """Whether the jump is in `parent` (`listed`: its rules as `_rules` gives them) with only HARMLESS_ABOVE
    rules above it."""
    line = _line("-A", parent, rule)
    return line in listed and all(HARMLESS_ABOVE.search(above) for above in listed[:listed.index(line)])


def _line(operation: str, chain: str, rule: list[str]) -> str:
    """A rule as `iptables -S` prints it (operation -A) and as iptables-restore reads it."""
    return " ".join([operation, chain, *rule])


def _rules(chain: str, must_list: bool = False, family: Family = IPV4) -> list[str]:
    """A chain's rules as `iptables -S` prints them, without its `-N` line; empty when it is missing, or raises when
    it `must_list` (a parent whose jumps are moved: read as empty, a jump would be inserted once more each time)."""
    run = subprocess.run([*_command(family.tool), "-S", chain], capture_output=True, text=True)
    if run.returncode != 0 and must_list:
        raise FirewallError(f"{family.tool} -S {chain} failed: {run.stderr.strip()}{NEEDS}")
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


def _command(tool: str = "iptables") -> list[str]:
    path = shutil.which(tool)
    if path is None:
        raise FirewallError(f"{tool} is not installed; the instance network cannot be closed without it")
    return [path, "-w", "10"]


def _succeeds(*args: str, family: Family = IPV4) -> bool:
    return subprocess.run([*_command(family.tool), *args], capture_output=True).returncode == 0


def _iptables(*args: str) -> None:
    run = subprocess.run([*_command(), *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise FirewallError(f"iptables {' '.join(args)} failed: {run.stderr.strip()}{NEEDS}")


def _restore(batch: list[str], family: Family = IPV4) -> None:
    """The filter table's `batch` of changes applied at once (nothing of it when one fails)."""
    script = "\n".join(["*filter", *batch, "COMMIT", ""])
    run = subprocess.run([*_command(family.restore), "--noflush"], input=script, capture_output=True, text=True)
    if run.returncode != 0:
        raise FirewallError(f"{family.restore} failed: {run.stderr.strip()}, applying:\n{script}{NEEDS}")

