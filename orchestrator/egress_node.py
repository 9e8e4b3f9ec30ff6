"""runtime: swarm: the instance's egress proxy on one node. `python -m orchestrator.egress_node`.

The Swarm runs it on every node (a global service, `<instance>-egress-proxy`, the orchestrator's image, the node's
network, as Debian's `proxy` user with no capability): it makes the node's own folder under the shared refusal-log
folder (several nodes appending to one file on shared storage would mix their lines), points squid's refusal log
there in a copy of the config, and becomes squid. The node's id comes from the service's template ({{.Node.ID}}).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from orchestrator import egress

CONFIG_COPY = Path("/tmp/squid.conf")  # on the container's tmpfs


def node_config(config: str, node_id: str) -> str:
    """The proxy's config with its refusal log in the node's folder. Pure."""
    shared = f"stdio:{egress.LOG_PATH}/{egress.LOG_NAME} "
    if config.count(shared) != 1:
        raise ValueError(f"the config names its refusal log other than as {shared.strip()}")
    return config.replace(shared, f"stdio:{egress.LOG_PATH}/{node_id}/{egress.LOG_NAME} ")


def prepare(node_id: str, log_root: Path, config_path: Path, copy_path: Path) -> None:
    """The node's log folder (the proxy's own, 0750) and the config copy that names it."""
    if not egress.NODE_ID.fullmatch(node_id):
        raise ValueError(f"NODE_ID {node_id!r} is not a Swarm node id")
    folder = log_root / node_id
    folder.mkdir(mode=0o750, exist_ok=True)
    if folder.is_symlink() or not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    copy_path.write_text(node_config(config_path.read_text(), node_id))


def main() -> None:
    try:
        prepare(os.environ.get("NODE_ID", ""), Path(egress.LOG_PATH), Path(egress.CONF_PATH) / egress.CONFIG_NAME,
                CONFIG_COPY)
    except (OSError, ValueError) as exc:
        sys.exit(f"the egress proxy cannot start on this node: {exc}")
    os.execvp("squid", ["squid", "-N", "-f", str(CONFIG_COPY)])


if __name__ == "__main__":
    main()
