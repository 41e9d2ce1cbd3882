"""Attacks 4 and 5 of issue 12 against a real ``serve reward`` (API key on).

4. gRPC without a key: 4 concurrent 120 MiB messages were read and parsed in full before
   UNAUTHENTICATED (RSS 1.1 -> 1.9 GiB); 300 made-up method names added 300 Prometheus series.
5. Slow clients: 200 idle, 100 slow-header and 50 slow-body connections held for 30-40 s were
   never closed. Here: 100 connections that send a body one byte a second.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import httpx
import pytest

from clients.process import ServerProcess
from tests.hostile.conftest import AUTH, MIB, READ_TIMEOUT_S, Probe, RssWatch, report, score_one

pytestmark = pytest.mark.slow


def _series(srv: ServerProcess) -> set[str]:
    """The gRPC request-counter series the server exports (name and labels, without values)."""
    text = httpx.get(srv.http_url + "/metrics", timeout=30).text
    return {
        line.rsplit(" ", 1)[0]
        for line in text.splitlines()
        if line.startswith("rlhf_reward_requests_total") and 'transport="grpc"' in line
    }


def test_unauthenticated_grpc_messages_are_refused_unread(reward_server: ServerProcess) -> None:
    big = b"\x0a" + b"\x80\x80\x80\x3c" + b"x" * (120 * MIB)  # field 1, 120 MiB: a ScoreRequest's bytes
    options = [("grpc.max_send_message_length", 256 * MIB), ("grpc.max_receive_message_length", 256 * MIB)]
    codes: list[grpc.StatusCode] = []

    def send() -> None:
        with grpc.insecure_channel(reward_server.grpc_target, options=options) as ch:
            call = ch.unary_unary("/rlhf.v1.RewardService/Score", None, None)
            try:
                call(big, timeout=120)
            except grpc.RpcError as exc:
                codes.append(exc.code())

    with RssWatch(reward_server.proc.pid) as rss, Probe(score_one, reward_server.http_url) as probe:
        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    report(
        "attack 4a (4 x 120 MiB unauthenticated gRPC)",
        codes=sorted(c.name for c in codes),
        rss_rise_mib=rss.rise_mib,
        probe_worst_s=probe.worst,
    )
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 4
    assert rss.rise_mib < 100
    assert not probe.errors


def test_made_up_method_names_add_no_metric_series(reward_server: ServerProcess) -> None:
    before = _series(reward_server)
    with grpc.insecure_channel(reward_server.grpc_target) as ch:
        for i in range(300):
            with pytest.raises(grpc.RpcError) as info:
                ch.unary_unary(f"/made.up.Service{i}/Method{i}", None, None)(b"", timeout=30)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    after = _series(reward_server)
    new = sorted(after - before)
    report("attack 4b (300 unknown gRPC methods)", series_before=len(before), series_after=len(after), new=new)
    assert all('method="unknown"' in s for s in new), new  # one "unknown" series, whatever the names
    assert len(new) <= 1


async def _slow_body(port: int, answers: list[tuple[float, bytes]], started: float) -> None:
    """Announce a 100 kB body and send it one byte a second until the server answers or hangs up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        "POST /v1/score HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        f"authorization: {AUTH['Authorization']}\r\ncontent-length: 100000\r\n\r\n"
    )
    writer.write(head.encode())
    data = b""
    try:
        while not data:
            writer.write(b" ")
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(65536), timeout=1.0)
            except (TimeoutError, asyncio.TimeoutError):
                continue
            if not data:  # closed without an answer
                break
    except (ConnectionError, OSError):
        pass
    answers.append((time.perf_counter() - started, data[:12]))
    writer.close()


def test_100_slow_bodies_are_cut_off_while_a_normal_client_is_served(reward_server: ServerProcess) -> None:
    answers: list[tuple[float, bytes]] = []

    async def attack() -> None:
        started = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(*(_slow_body(reward_server.http_port, answers, started) for _ in range(100))), 120
        )

    with Probe(score_one, reward_server.http_url) as probe:
        asyncio.run(attack())
    last = max((t for t, _ in answers), default=0.0)
    got_408 = sum(1 for _, head in answers if head.startswith(b"HTTP/1.1 408"))
    report(
        "attack 5 (100 slow bodies, 1 byte/s)",
        closed=len(answers),
        answered_408=got_408,
        last_closed_s=last,
        read_timeout_s=READ_TIMEOUT_S,
        probe_worst_s=probe.worst,
        probes=len(probe.latencies),
    )
    assert len(answers) == 100 and got_408 == 100
    assert last < READ_TIMEOUT_S * 3 + 5
    assert not probe.errors
