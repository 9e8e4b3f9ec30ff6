"""Prometheus metrics and the health endpoint. The only module that imports prometheus_client
(a well-kept library: the exposition format, histograms and a registry are not worth writing again).

Served on `metrics.listen` (off by default): `/metrics` for Prometheus, `/healthz` answering 200 when the
Feishu connection, the Docker engine, the store and each of the service's loops (the outbox, each housekeeping
step, the Docker events, the channel: `supervise.LIVENESS`) are all fine, 503 (with what is wrong) otherwise.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry()
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800)

MESSAGES = Counter("orchestrator_messages_total", "Chat messages by what became of them",
                   ["outcome"], registry=REGISTRY)  # received, duplicate, answered, failed, refused, merged
TURN_SECONDS = Histogram("orchestrator_turn_seconds", "Wall time of agent turns", buckets=_SECONDS,
                         registry=REGISTRY)
QUEUE_WAIT_SECONDS = Histogram("orchestrator_queue_wait_seconds", "From receiving a message to starting its turn",
                               buckets=_SECONDS, registry=REGISTRY)
OVERHEAD_SECONDS = Histogram("orchestrator_turn_overhead_seconds",
                             "A turn's wall time less what the CLI reports: container start, exec, CLI start-up",
                             buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=REGISTRY)
DELIVERIES = Counter("orchestrator_deliveries_total", "Outbox sends by result", ["result"],
                     registry=REGISTRY)  # sent, retry, dead
FEISHU_RETRIES = Counter("orchestrator_feishu_retries_total", "Feishu API calls tried again", registry=REGISTRY)
RATE_LIMIT_WAIT = Counter("orchestrator_feishu_rate_limit_wait_seconds_total",
                          "Seconds sends waited for the rate limiter", registry=REGISTRY)
CONTAINERS_RUNNING = Gauge("orchestrator_containers_running", "Chat containers running", registry=REGISTRY)
BUSY_CHATS = Gauge("orchestrator_busy_chats", "Chats with a turn running", registry=REGISTRY)
EGRESS_REFUSED = Counter("orchestrator_egress_refused_total", "Requests the egress proxy refused, by chat ('-': bad "
                         "proxy credentials)", ["chat_id"], registry=REGISTRY)
CHAT_SPENT_USD = Gauge("orchestrator_chat_spent_usd", "What each chat spent in the current budget day and month, "
                       "priced from the gateway's usage records", ["chat_id", "period"], registry=REGISTRY)

APPROVALS = Counter("orchestrator_approvals_total", "Permission requests of agents, by what became of them",
                    ["outcome"], registry=REGISTRY)  # asked, allowed, denied, timed_out, cancelled
APPROVAL_WAIT_SECONDS = Histogram("orchestrator_approval_wait_seconds", "From a permission request to its decision",
                                  buckets=_SECONDS, registry=REGISTRY)


def serve(host: str, port: int, health: Callable[[], dict[str, str | None]]) -> ThreadingHTTPServer:
    """Start the endpoint on a thread of its own. `health` maps each check to None (fine) or a problem."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
            elif path == "/healthz":
                checks = health()
                healthy = all(problem is None for problem in checks.values())
                body = {"status": "ok" if healthy else "unhealthy",
                        "checks": {name: problem or "ok" for name, problem in checks.items()}}
                self._reply(200 if healthy else 503, "application/json", json.dumps(body).encode())
            else:
                self._reply(404, "text/plain", b"not found\n")

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server_class = type("Server", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6}) if ":" in host \
        else ThreadingHTTPServer
    server = server_class((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
