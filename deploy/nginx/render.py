"""Render nginx.conf.template: ``python deploy/nginx/render.py`` rewrites nginx.conf (compose).

The load-balancer test imports :func:`render` to make a loopback config from the same template.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "nginx.conf.template"
OUTPUT = HERE / "nginx.conf"

# Passive health checks: a replica that fails (connection error, timeout, 502/503) is skipped
# for fail_timeout, then tried again.
SERVER_PARAMS = "max_fails=1 fail_timeout=2s"

# docker-compose: replicas by their service names, logs to the container's stdout/stderr.
COMPOSE = {
    "main": "pid /tmp/nginx.pid;\nerror_log /dev/stderr notice;",
    "logs": "    access_log /dev/stdout upstream;",
    "http_listen": "8000",
    "grpc_listen": "50051",
    "reward_http": ["reward-1:8000", "reward-2:8000"],
    "reward_grpc": ["reward-1:50051", "reward-2:50051"],
}


def render(
    *,
    main: str,
    logs: str,
    http_listen: str,
    grpc_listen: str,
    reward_http: Sequence[str],
    reward_grpc: Sequence[str],
) -> str:
    def servers(addrs: Sequence[str]) -> str:
        return "\n".join(f"        server {a} {SERVER_PARAMS};" for a in addrs)

    values = {
        "main": main,
        "logs": logs,
        "http_listen": http_listen,
        "grpc_listen": grpc_listen,
        "reward_http_servers": servers(reward_http),
        "reward_grpc_servers": servers(reward_grpc),
    }
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        raise ValueError("unfilled placeholder in " + str(TEMPLATE))
    header = "# GENERATED from nginx.conf.template by render.py: edit the template, not this file.\n"
    return header + text


def compose_config() -> str:
    return render(**COMPOSE)  # type: ignore[arg-type]


if __name__ == "__main__":
    OUTPUT.write_text(compose_config())
    sys.stdout.write(f"wrote {OUTPUT}\n")
