"""Issue 6, part 4: three reward replicas behind Debian's nginx (and, separately, behind the gRPC
client's own round-robin); mid-run one replica is SIGKILLed and another gets SIGTERM.

Every item is scored, each exactly once as seen by the client: all indices present once, each score
equal (1e-5) to an unbatched ``transformers`` forward of the same text (the texts' scores are
distinct, so a lost, duplicated or misplaced result would show). The SIGTERMed replica exits 0 and
drains with zero failed requests: in nginx's access log (``$upstream_addr``/``$upstream_status`` per
attempt) every answer it gave is 200, or 503 once its drain began (nginx replayed those on another
replica); no request to it was cut off; and it answered requests that straddled the SIGTERM (so the
drain was really exercised). Client-side every nginx answer is 200.

gRPC through nginx runs the SIGTERM half only: nginx streams gRPC request bodies to the upstream
unbuffered, so it cannot replay a call whose replica dies mid-call (SIGKILL); it answers that call
with RST_STREAM INTERNAL_ERROR, which the client (rightly) does not retry as a transient error. The
drain is clean (UNAVAILABLE before admission, retried by the client), and the gRPC client's own
round-robin (no nginx) survives both the SIGKILL and the SIGTERM.

nginx: installed by ``.ci/run``; if missing here, the set-up installs ``nginx-light`` with apt
(root), and skips only when apt is unavailable.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from clients import RewardClient
from clients.process import ServerProcess, free_port
from tests.support.paths import ROOT
from tests.support.workload import reference_scores, texts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

NGINX_DIR = ROOT / "deploy" / "nginx"
N = 3000
BATCH = 40  # items per client call; each call is 5 requests of 8 items
WORKERS = 6
REPLICA_FLAGS = [
    "--max-batch-tokens", "512", "--max-items-per-request", "8", "--max-wait-ms", "20", "--threads", "1",
    "--drain-seconds", "20", "--log-level", "info",
]  # fmt: skip


def load_render() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nginx_render", NGINX_DIR / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compose_nginx_conf_is_rendered_from_the_template() -> None:
    render = load_render()
    assert (NGINX_DIR / "nginx.conf").read_text() == render.compose_config(), (
        "deploy/nginx/nginx.conf is stale: run `python deploy/nginx/render.py`"
    )
    conf = (NGINX_DIR / "nginx.conf").read_text()
    assert "proxy_next_upstream error timeout http_502 http_503 non_idempotent;" in conf
    assert "grpc_pass grpc://reward_grpc;" in conf and "client_max_body_size 64m;" in conf
    assert "server reward-1:8000" in conf and "server reward-2:50051" in conf


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip("nginx is not installed and apt-get is unavailable to install Debian's nginx")
    if os.geteuid() != 0:
        pytest.skip("nginx is not installed and installing it with apt-get needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "nginx-light"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(cmd, env=env, capture_output=True, check=True)
    return shutil.which("nginx") or "/usr/sbin/nginx"


@dataclass
class Nginx:
    proc: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    access_log: Path
    error_log: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[Callable[[list[ServerProcess]], Nginx]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(replicas: list[ServerProcess]) -> Nginx:
        binary = nginx_binary()
        render = load_render()
        d = tmp_path / "nginx"
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (d / "temp" / sub).mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
        temp = "\n".join(
            f"    {name}_temp_path {d / 'temp' / sub};"
            for name, sub in [("client_body", "client_body"), ("proxy", "proxy"), ("fastcgi", "fastcgi"),
                              ("uwsgi", "uwsgi"), ("scgi", "scgi")]
        )  # fmt: skip
        main = f"pid {d / 'nginx.pid'};\nerror_log {d / 'error.log'} info;"
        if os.geteuid() == 0:
            main += "\nuser root;"  # workers must reach the private pytest tmp dir
        http_port, grpc_port = free_port(), free_port()
        conf = render.render(
            main=main,
            logs=f"    access_log {d / 'access.log'} upstream;\n{temp}",
            http_listen=f"127.0.0.1:{http_port}",
            grpc_listen=f"127.0.0.1:{grpc_port}",
            reward_http=[f"127.0.0.1:{r.http_port}" for r in replicas],
            reward_grpc=[f"127.0.0.1:{r.grpc_port}" for r in replicas],
        )
        (d / "nginx.conf").write_text(conf)
        proc = subprocess.Popen(
            [binary, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=open(d / "stderr.log", "wb"),  # noqa: SIM115
        )
        started.append(proc)
        ngx = Nginx(proc, http_port, grpc_port, d / "access.log", d / "error.log")
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited {proc.returncode}: {(d / 'stderr.log').read_text()}")
            try:
                httpx.get(ngx.http_url + "/health/live", timeout=2)
                return ngx
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful stop
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Run:
    """Many concurrent client calls over the items; progress counted in items."""

    client: RewardClient
    items: list[str]
    scores: list[list[float | None]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    done_items: int = 0
    item_errors: dict[int, object] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.scores = [[] for _ in self.items]  # every result for each index: exactly one expected

    def worker(self, batches: list[int]) -> None:
        for start in batches:
            chunk = self.items[start : start + BATCH]
            try:
                got = self.client.score_texts(chunk)
            except BaseException as exc:
                self.errors.append(exc)
                return
            with self.lock:
                self.item_errors.update({start + i: e for i, e in got.errors.items()})
                for i, s in enumerate(got):
                    self.scores[start + i].append(s)
                self.done_items += len(chunk)

    def start(self) -> list[threading.Thread]:
        starts = list(range(0, len(self.items), BATCH))
        threads = [
            threading.Thread(target=self.worker, args=(starts[w::WORKERS],), daemon=True) for w in range(WORKERS)
        ]
        for t in threads:
            t.start()
        return threads

    def wait_for(self, items: int, threads: list[threading.Thread], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.done_items < items:
            assert any(t.is_alive() for t in threads), f"the run ended early: {self.errors}"
            assert time.monotonic() < deadline, f"no progress: {self.done_items} items"
            time.sleep(0.01)


LINE = re.compile(
    r'^(?P<msec>[\d.]+) (?P<rt>[\d.]+) (?P<status>\d+) "(?P<req>[^"]*)" addr="(?P<addr>[^"]*)" '
    r'ustatus="(?P<ustatus>[^"]*)" uconnect="(?P<uconnect>[^"]*)" uheader="(?P<uheader>[^"]*)"'
)


@dataclass
class Attempt:
    end: float  # when the whole request ended (epoch seconds)
    duration: float
    status: str
    connected: bool
    answered: bool
    retried: bool


def attempts_by_upstream(access_log: Path) -> tuple[dict[str, list[Attempt]], list[str]]:
    """Every upstream attempt in nginx's access log, by upstream address; and the final statuses."""
    by_addr: dict[str, list[Attempt]] = {}
    finals = []
    for line in access_log.read_text().splitlines():
        m = LINE.match(line)
        assert m, line
        finals.append(m["status"])
        addrs = m["addr"].split(", ")
        for a, s, c, h in zip(
            addrs, m["ustatus"].split(", "), m["uconnect"].split(", "), m["uheader"].split(", "), strict=True
        ):
            by_addr.setdefault(a, []).append(
                Attempt(float(m["msec"]), float(m["rt"]), s, c != "-", h != "-", len(addrs) > 1)
            )
    return by_addr, finals


def check_exactly_once(run: Run, want: list[float]) -> None:
    assert not run.errors, repr(run.errors[:3])
    assert not run.item_errors, f"{len(run.item_errors)} item errors: {list(run.item_errors.items())[:3]}"
    counts = [len(s) for s in run.scores]
    assert all(c == 1 for c in counts), (
        f"items without exactly one result: {[i for i, c in enumerate(counts) if c != 1][:10]}"
    )
    bad = [
        i
        for i, (got, ref) in enumerate(zip(run.scores, want, strict=True))
        if got[0] is None or abs(got[0] - ref) > 1e-5
    ]
    assert not bad, (
        f"{len(bad)} scores differ from the reference, first at {bad[0]}: {run.scores[bad[0]]} vs {want[bad[0]]}"
    )


def start_replicas(model_dir: Path, tmp_path: Path) -> list[ServerProcess]:
    flags = ["--model", str(model_dir), *REPLICA_FLAGS]
    return [ServerProcess.reward(flags, log_path=tmp_path / f"replica-{i}.log") for i in range(3)]


def wait_in_flight(replica: ServerProcess, timeout: float = 30) -> None:
    """Return once the replica is handling a request, so that its SIGTERM lands on work in flight.

    On a busy machine the client can be the bottleneck and a replica idle for a moment; a SIGTERM
    then would test no drain at all.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{replica.http_port}/metrics", timeout=10).text
        found = re.search(r"^rlhf_reward_requests_in_flight (\S+)$", text, re.MULTILINE)
        if found and float(found.group(1)) >= 1:
            return
        time.sleep(0.001)


@pytest.fixture
def items() -> list[str]:
    first = 2000  # the texts of test_replica_restart, each prefixed here
    return [f"lb {t}" for t in texts(first)] + [f"lb2 {t}" for t in texts(N - first)]


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_nginx_kill_and_drain_under_load(
    transport: str,
    items: list[str],
    tiny_llama_dir: Path,
    tmp_path: Path,
    nginx_factory: Callable[[list[ServerProcess]], Nginx],
) -> None:
    t0 = time.monotonic()
    replicas = start_replicas(tiny_llama_dir, tmp_path)
    killed, drained, _ = replicas
    try:
        want = reference_scores(tiny_llama_dir, items)  # while the replicas load
        for r in replicas:
            r.wait_ready(60)
        ngx = nginx_factory(replicas)
        url = ngx.http_url if transport == "http" else f"grpc://127.0.0.1:{ngx.grpc_port}"
        client = RewardClient(url, chunk_size=8, max_concurrency=4, max_retries=20, timeout=30)
        run = Run(client, items)
        started = time.monotonic()
        threads = run.start()
        run.wait_for(N // 5, threads)
        if transport == "http":
            os.kill(killed.proc.pid, signal.SIGKILL)
        run.wait_for(N // 3, threads)
        wait_in_flight(drained)
        sigterm_at = time.time()
        drained.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(90)
        elapsed = time.monotonic() - started
        assert not any(t.is_alive() for t in threads), f"the client did not finish ({run.done_items} items)"
        drained_code = drained.proc.wait(30)
        done_when_drained = run.done_items
        client.close()
    finally:
        for r in replicas:
            r.terminate()

    check_exactly_once(run, want)
    assert killed.proc.returncode == (-signal.SIGKILL if transport == "http" else 0)
    assert drained_code == 0, drained.log_tail()
    assert "drain timed out" not in drained.log_tail(400)

    ngx.proc.send_signal(signal.SIGQUIT)  # flush the log
    ngx.proc.wait(10)
    by_addr, finals = attempts_by_upstream(ngx.access_log)
    d_port = drained.http_port if transport == "http" else drained.grpc_port
    k_port = killed.http_port if transport == "http" else killed.grpc_port
    d_attempts = by_addr.get(f"127.0.0.1:{d_port}", [])
    k_attempts = by_addr.get(f"127.0.0.1:{k_port}", [])
    d_after = [a for a in d_attempts if a.end >= sigterm_at]
    # The drained replica: every answer 200, or 503 only once its drain began; none cut off
    # after it connected (an attempt that connected but got no answer is an admitted request lost).
    wrong = [
        a for a in d_attempts if a.answered and not (a.status == "200" or (a.status == "503" and a.end >= sigterm_at))
    ]
    cut_off = [a for a in d_attempts if a.connected and not a.answered]
    straddled = [a for a in d_after if a.status == "200" and a.end - a.duration < sigterm_at]
    summary = (
        f"{transport}: {N} items in {elapsed:.1f}s ({len(finals)} requests via nginx, "
        f"{sum(1 for s in finals if s != '200')} non-200 to the client); "
        f"killed replica: {len(k_attempts)} attempts, {sum(1 for a in k_attempts if a.status != '200')} failed; "
        f"drained replica: {len(d_attempts)} attempts, {sum(1 for a in d_attempts if a.status == '200')} 200, "
        f"{sum(1 for a in d_after if a.status == '503')} 503 while draining, {len(straddled)} answered across SIGTERM, "
        f"{sum(1 for a in d_attempts if not a.connected)} refused connections; "
        f"retried requests {sum(1 for v in by_addr.values() for a in v if a.retried)}; "
        f"total {time.monotonic() - t0:.1f}s"
    )
    print(summary)
    assert all(s == "200" for s in finals), summary
    assert not wrong, f"the draining replica failed requests: {wrong[:5]}; {summary}"
    assert not cut_off, f"requests cut off on the draining replica: {cut_off[:5]}; {summary}"
    assert straddled, f"nothing was in flight on the drained replica at SIGTERM: not a drain test; {summary}"
    assert done_when_drained == N
    if transport == "http":
        assert [a for a in k_attempts if a.status != "200"], f"the SIGKILL hit nothing in flight; {summary}"


def test_grpc_round_robin_kill_and_drain_under_load(items: list[str], tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The same with no load balancer: RewardClient over the three gRPC endpoints."""
    t0 = time.monotonic()
    replicas = start_replicas(tiny_llama_dir, tmp_path)
    killed, drained, _ = replicas
    try:
        want = reference_scores(tiny_llama_dir, items)
        for r in replicas:
            r.wait_ready(60)
        client = RewardClient(
            [f"grpc://{r.grpc_target}" for r in replicas], chunk_size=8, max_concurrency=4, max_retries=20, timeout=30
        )
        run = Run(client, items)
        started = time.monotonic()
        threads = run.start()
        run.wait_for(N // 5, threads)
        os.kill(killed.proc.pid, signal.SIGKILL)
        run.wait_for(N // 3, threads)
        wait_in_flight(drained)
        drained.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(90)
        elapsed = time.monotonic() - started
        assert not any(t.is_alive() for t in threads), f"the client did not finish ({run.done_items} items)"
        drained_code = drained.proc.wait(30)
        client.close()
    finally:
        for r in replicas:
            r.terminate()
    print(f"grpc round-robin: {N} items in {elapsed:.1f}s; total {time.monotonic() - t0:.1f}s")
    check_exactly_once(run, want)
    assert drained_code == 0, drained.log_tail()
    assert "drain timed out" not in drained.log_tail(400)
