"""runtime: swarm: the instance's guard on one node.
`python -m orchestrator.node_guard INSTANCE BRIDGE [OPEN_BRIDGE]`.

The Swarm runs it on every node (a global service, `<instance>-guard`, the orchestrator's image, the node's network,
root with CAP_NET_ADMIN and CAP_NET_RAW only). It keeps the node's firewall rules for the chats' bridge and, when
some chat's egress is open, the open chats' bridge (`firewall.install_node`): nothing from a chat reaches the node
itself (its sshd, a local database, the engine's ports, at the bridge's gateway address), no chat reaches another
on the node, and an open chat reaches the internet but no private, shared, link-local or loopback address. Every
CHECK_SECONDS it looks, puts back what is missing (a firewall reload, a flush by hand), and touches HEALTH_FILE; the
service's health check reads that file's age, so Swarm reports the task running only once the rules are in place
and kills it when they cannot be kept. The orchestrator labels the nodes where it and the model gateway run
(`runtime.ready_label`), and places chats only there. The rules stay when it stops: they close the bridges, and
nothing else.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from loguru import logger

from orchestrator import firewall
from orchestrator.logs import setup_logging
from orchestrator.supervise import Streak

# Each check runs iptables three times, and each health check is an exec into the container: kept to every 5 s
# (rules put back within that), as on the tests' three nodes sharing 2 cores they compete with the chats' turns.
CHECK_SECONDS = 5.0
HEALTH_FILE = Path("/run/orchestrator-guard.ok")
HEALTHY_SECONDS = 15  # the health check fails when the file is older: the loop is stuck


# The chat-to-chat DROP sees bridged frames only when the kernel passes them through iptables (br_netfilter):
# engines since 27.3 load it only for networks with enable_icc=false, and a host may turn it off.
BRIDGE_NETFILTER = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")


def keep(instance: str, bridge: str, open_bridge: str | None, stop: threading.Event,
         bridge_netfilter: Path = BRIDGE_NETFILTER, health_file: Path = HEALTH_FILE) -> None:
    streak = Streak("node_guard")  # a failure logged when it differs from the last, a recovery once
    while not stop.is_set():
        try:
            if not bridge_netfilter.exists() or bridge_netfilter.read_text().strip() != "1":
                raise firewall.FirewallError(f"{bridge_netfilter} is not 1: bridged traffic between chats passes "
                                             "no iptables rule (modprobe br_netfilter; sysctl "
                                             "net.bridge.bridge-nf-call-iptables=1)")
            if not firewall.node_intact(instance, bridge, open_bridge):
                firewall.install_node(instance, bridge, open_bridge)
                bridges = bridge + (f" and {open_bridge}" if open_bridge else "")
                logger.info(f"node rules for {bridges} installed (iptables {firewall.node_chain(instance)}, "
                            "INPUT, DOCKER-USER)")
            health_file.touch()
            streak.ok()
        except (firewall.FirewallError, OSError) as exc:
            streak.failed(exc)  # its backoff is not taken: the rules are looked at again every CHECK_SECONDS
        stop.wait(CHECK_SECONDS)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        sys.exit("usage: python -m orchestrator.node_guard INSTANCE BRIDGE [OPEN_BRIDGE]")
    setup_logging()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    instance, bridge, open_bridge = args[0], args[1], args[2] if len(args) == 3 else None
    logger.info(f"guarding the chats' bridge {bridge}" + (f" and the open chats' {open_bridge}" if open_bridge else "")
                + f" of instance {instance} on this node")
    keep(instance, bridge, open_bridge, stop)
    logger.info("guard stopped; the node's rules stay")


if __name__ == "__main__":
    main()
