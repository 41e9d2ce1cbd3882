"""What every client shares: endpoints, connections, one attempt over HTTP or gRPC, the retry loop,
pickling, and the event-loop thread the sync twins run the (one, async) core on.

Design: each client has one async core (``_RewardCore``, ``_JudgeCore``) holding all behaviour:
request building, chunking, the retry policy, error mapping and result types. The async client
awaits it in the caller's event loop; the sync client is a thin wrapper that runs the same core
on a private event loop in a daemon thread (one per process, shared by all sync clients), so
the two twins cannot drift apart. Connections (an ``httpx.AsyncClient``, ``grpc.aio`` channels)
belong to the event loop and process that opened them: they open lazily on first use, again in
another loop or after ``fork``, and are dropped by pickling.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import grpc
import httpx
import orjson

from clients.errors import (
    ConnectionFailedError,
    DeadlineExceededError,
    RlhfFeedbackError,
    ServerError,
    UnavailableError,
    from_grpc,
    from_http,
)
from clients.retry import AttemptTimeout, RequestIds, RetryPolicy, attempt_timeout, remaining

T = TypeVar("T")

API_KEY_ENV = "RLHF_FEEDBACK_API_KEY"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rlhf-feedback")
    except PackageNotFoundError:  # a source tree without an install
        return "0.0.0+unknown"


USER_AGENT = f"rlhf-feedback-client/{_version()}"
# An attempt may outlive the caller's deadline by this much, so that a server that answers at the
# deadline (per-item DEADLINE_EXCEEDED results) is still heard.
DEADLINE_GRACE_S = 0.25
ENDPOINT_COOLDOWN_S = 2.0

# -- endpoints -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One server address. ``kind`` picks the transport; ``target`` is the HTTP base URL or the
    gRPC target (``host:port``, ``dns:///name:port``)."""

    kind: Literal["http", "grpc"]
    target: str
    tls: bool = False
    round_robin: bool = False

    def __str__(self) -> str:
        if self.kind == "http":
            return self.target
        return self.target if self.round_robin else f"{'grpcs' if self.tls else 'grpc'}://{self.target}"


def parse_endpoint(url: str) -> Endpoint:
    """``http(s)://host:port[/prefix]`` → HTTP/JSON; ``grpc(s)://host:port`` → gRPC;
    ``dns:///name:port`` → gRPC with client-side round-robin over every address of ``name``."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"an endpoint is a non-empty URL string, got {url!r}")
    url = url.strip()
    if url.startswith("dns:"):
        return Endpoint("grpc", url, tls=False, round_robin=True)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if not parts.netloc:
            raise ValueError(f"no host in {url!r}")
        return Endpoint("http", url.rstrip("/"), tls=scheme == "https")
    if scheme in ("grpc", "grpcs"):
        if not parts.netloc or parts.path not in ("", "/"):
            raise ValueError(f"expected grpc://host:port, got {url!r}")
        return Endpoint("grpc", parts.netloc, tls=scheme == "grpcs")
    raise ValueError(f"unsupported URL {url!r}: use http://, https://, grpc://, grpcs:// or dns:///name:port")


def parse_endpoints(url: str | Sequence[str]) -> tuple[Endpoint, ...]:
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise ValueError("no endpoint given")
    return tuple(parse_endpoint(u) for u in urls)


class EndpointPool:
    """Picks the endpoint of an attempt: rotation by a hint (chunk number + retry number), skipping
    endpoints that just failed to connect (for a short cool-down) while another one is available."""

    def __init__(self, n: int) -> None:
        self._down_until = [0.0] * n

    def pick(self, hint: int) -> int:
        n = len(self._down_until)
        now = time.monotonic()
        for j in range(n):
            i = (hint + j) % n
            if self._down_until[i] <= now:
                return i
        return hint % n

    def down(self, i: int) -> None:
        self._down_until[i] = time.monotonic() + ENDPOINT_COOLDOWN_S

    def up(self, i: int) -> None:
        self._down_until[i] = 0.0


# -- connections (per event loop) -----------------------------------------------------------------


class Connections:
    """The connections of one event loop in one process: an httpx client and one gRPC channel per
    endpoint, opened on first use."""

    def __init__(self, endpoints: Sequence[Endpoint], *, tls_ca: str | None, max_concurrency: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.pid = os.getpid()
        self._endpoints = endpoints
        self._tls_ca = tls_ca
        self._max_concurrency = max_concurrency
        self._http: httpx.AsyncClient | None = None
        self._channels: dict[Endpoint, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[Endpoint, Any], Any] = {}
        # Requests (chunks) in flight from this client in this loop, across concurrent calls.
        self.gate = asyncio.Semaphore(max_concurrency)

    def current(self) -> bool:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        return loop is self.loop and os.getpid() == self.pid

    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            verify: ssl.SSLContext | bool = True
            if self._tls_ca is not None:
                verify = ssl.create_default_context(cafile=self._tls_ca)
            n = max(4, 2 * self._max_concurrency) * len(self._endpoints)
            self._http = httpx.AsyncClient(
                verify=verify,
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                headers={"user-agent": USER_AGENT},
                timeout=None,
            )
        return self._http

    def channel(self, ep: Endpoint) -> grpc.aio.Channel:
        channel = self._channels.get(ep)
        if channel is None:
            options: list[tuple[str, Any]] = [
                ("grpc.max_receive_message_length", -1),
                ("grpc.max_send_message_length", -1),
                ("grpc.primary_user_agent", USER_AGENT),
                # A replica that comes back is found quickly (grpc's default waits up to 120 s).
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ]
            if ep.round_robin:
                options.append(("grpc.lb_policy_name", "round_robin"))
            if ep.tls:
                root = None
                if self._tls_ca is not None:
                    with open(self._tls_ca, "rb") as f:
                        root = f.read()
                creds = grpc.ssl_channel_credentials(root_certificates=root)
                channel = grpc.aio.secure_channel(ep.target, creds, options=options)
            else:
                channel = grpc.aio.insecure_channel(ep.target, options=options)
            self._channels[ep] = channel
        return channel

    def stub(self, ep: Endpoint, stub_cls: Callable[[grpc.aio.Channel], T]) -> T:
        key = (ep, stub_cls)
        stub = self._stubs.get(key)
        if stub is None:
            stub = self._stubs[key] = stub_cls(self.channel(ep))
        return stub

    async def aclose(self) -> None:
        http, self._http = self._http, None
        channels, self._channels = list(self._channels.values()), {}
        self._stubs = {}
        if http is not None:
            await http.aclose()
        for channel in channels:
            await channel.close(None)


# -- the shared core -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """What one attempt needs to know: its endpoint, its request's ids and the caller's deadline."""

    endpoint: Endpoint
    ids: RequestIds
    deadline: float | None


class BaseCore:
    """Configuration, connections and the retry loop shared by every client core."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        api_key: str | None,
        timeout: float | None,
        max_retries: int,
        max_concurrency: int,
        tls_ca: str | os.PathLike[str] | None,
    ) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive (or None for no per-attempt timeout)")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.endpoints = parse_endpoints(url)
        self.api_key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
        self.timeout = timeout
        self.max_concurrency = max_concurrency
        self.tls_ca = os.fspath(tls_ca) if tls_ca is not None else None
        self.policy = RetryPolicy(max_retries=max_retries)
        self._pool = EndpointPool(len(self.endpoints))
        self._conns: Connections | None = None

    # -- pickling: configuration travels, connections do not ------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_conns"] = None
        state["_pool"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pool = EndpointPool(len(self.endpoints))

    # -- connections -----------------------------------------------------------------------------

    def conns(self) -> Connections:
        conns = self._conns
        if conns is None or not conns.current():
            # Another loop's (or the parent process's) connections cannot be used here; they close
            # with their loop. Open this loop's own.
            conns = self._conns = Connections(self.endpoints, tls_ca=self.tls_ca, max_concurrency=self.max_concurrency)
        return conns

    async def aclose(self) -> None:
        conns, self._conns = self._conns, None
        if conns is not None and conns.current():
            await conns.aclose()

    # -- the retry loop --------------------------------------------------------------------------

    async def call(
        self,
        attempt: Callable[[Attempt], Awaitable[T]],
        *,
        deadline: float | None,
        hint: int = 0,
        idempotent: bool = True,
    ) -> T:
        """Run ``attempt`` until it succeeds or the policy gives up; one set of ids for all tries."""
        ids = RequestIds()
        tried: set[int] = set()
        retry = 0
        while True:
            left = remaining(deadline)
            if left is not None and left <= 0.001:
                raise DeadlineExceededError(
                    "the deadline passed before the request could be sent", request_id=ids.request_id
                )
            i = self._pool.pick(hint + retry)
            tried.add(i)
            try:
                result = await attempt(Attempt(self.endpoints[i], ids, deadline))
            except RlhfFeedbackError as err:
                if isinstance(err, ConnectionFailedError | UnavailableError):
                    self._pool.down(i)
                if isinstance(err, AttemptTimeout) and deadline is not None and time.monotonic() >= deadline:
                    raise DeadlineExceededError(
                        f"no answer before the deadline ({err.message})", request_id=ids.request_id
                    ) from None
                wait = self.policy.delay(
                    err,
                    retry=retry,
                    idempotent=idempotent,
                    deadline=deadline,
                    untried_endpoints=len(self.endpoints) - len(tried),
                )
                if wait is None:
                    raise
                retry += 1
                if wait > 0:
                    await asyncio.sleep(wait)
                continue
            self._pool.up(i)
            return result

    # -- one attempt, HTTP ----------------------------------------------------------------------

    def http_headers(self, at: Attempt) -> dict[str, str]:
        headers = {
            "content-type": "application/json",
            "idempotency-key": at.ids.idempotency_key,
            "x-request-id": at.ids.request_id,
        }
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        left = remaining(at.deadline)
        if left is not None:
            headers["x-request-timeout"] = f"{max(left, 0.001):.3f}"
        return headers

    async def http_call(self, at: Attempt, method: str, path: str, body: Any = None, *, offset: int = 0) -> Any:
        """One HTTP attempt; the decoded JSON answer, or the mapped error."""
        timeout = attempt_timeout(self.timeout, at.deadline, grace=DEADLINE_GRACE_S)
        rid = at.ids.request_id
        content = orjson.dumps(body) if body is not None else None
        request = (
            self.conns()
            .http()
            .request(
                method,
                at.endpoint.target + path,
                content=content,
                headers=self.http_headers(at),
                timeout=httpx.Timeout(timeout),
            )
        )
        try:
            resp = await asyncio.wait_for(request, timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ConnectionFailedError(f"{at.endpoint}: {exc or type(exc).__name__}", request_id=rid) from None
        except (httpx.TimeoutException, asyncio.TimeoutError):
            raise AttemptTimeout(f"{at.endpoint}: no answer within {_secs(timeout)}", request_id=rid) from None
        except httpx.TransportError as exc:
            # Read/write errors, a connection closed mid-answer: the request may have arrived.
            raise ConnectionFailedError(
                f"{at.endpoint}: {type(exc).__name__}: {exc}", sent=True, request_id=rid
            ) from None
        try:
            data = orjson.loads(resp.content) if resp.content else None
        except orjson.JSONDecodeError:
            data = resp.text[:200] if resp.status_code >= 400 else None
            if resp.status_code < 400:
                raise ServerError(f"{at.endpoint}: the answer is not JSON", request_id=rid) from None
        if resp.status_code >= 400:
            raise from_http(resp.status_code, data, resp.headers, request_id=rid, offset=offset)
        return data

    # -- one attempt, gRPC ------------------------------------------------------------------------

    def grpc_metadata(self, at: Attempt) -> tuple[tuple[str, str], ...]:
        md = [("idempotency-key", at.ids.idempotency_key), ("x-request-id", at.ids.request_id)]
        if self.api_key:
            md.append(("authorization", f"Bearer {self.api_key}"))
        return tuple(md)

    async def grpc_call(self, at: Attempt, method: Callable[..., Any], request: Any, *, offset: int = 0) -> Any:
        """One unary gRPC attempt through a stub ``method``; the reply, or the mapped error."""
        timeout = attempt_timeout(self.timeout, at.deadline, grace=DEADLINE_GRACE_S)
        try:
            return await method(request, timeout=timeout, metadata=self.grpc_metadata(at))
        except grpc.aio.AioRpcError as exc:
            err = from_grpc(exc, request_id=at.ids.request_id, offset=offset)
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "Deadline Exceeded" in (exc.details() or ""):
                # The client's own timer (grpc's wording), not a server's DEADLINE_EXCEEDED.
                raise AttemptTimeout(
                    f"{at.endpoint}: no answer within {_secs(timeout)}", request_id=at.ids.request_id
                ) from None
            raise err from None


def _secs(timeout: float | None) -> str:
    return "the timeout" if timeout is None else f"{timeout:.3g} s"


# -- the sync twins' event loop -------------------------------------------------------------------


class LoopThread:
    """A private event loop in a daemon thread, shared by every sync client of a process."""

    _lock = threading.Lock()
    _instance: LoopThread | None = None

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._main, args=(ready,), name="rlhf-feedback-client", daemon=True)
        self.thread.start()
        ready.wait()

    def _main(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        self.loop.run_forever()

    @classmethod
    def get(cls) -> LoopThread:
        inst = cls._instance
        if inst is None or inst.pid != os.getpid() or not inst.thread.is_alive():
            with cls._lock:
                inst = cls._instance
                if inst is None or inst.pid != os.getpid() or not inst.thread.is_alive():
                    inst = cls._instance = LoopThread()  # after fork the parent's thread is gone
        return inst

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("a sync client was called from its own event-loop thread; use the async client")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            # KeyboardInterrupt (or any exit) in the caller: stop the work it was waiting for.
            future.cancel()
            raise


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a core coroutine for a sync client on the shared loop thread and wait for its result."""
    return LoopThread.get().run(coro)


def close_sync(core: BaseCore) -> None:
    inst = LoopThread._instance
    if inst is not None and inst.pid == os.getpid() and inst.thread.is_alive():
        with contextlib.suppress(concurrent.futures.CancelledError, RuntimeError):
            inst.run(core.aclose())


def deadline_from(deadline_s: float | None) -> float | None:
    if deadline_s is None:
        return None
    if deadline_s <= 0:
        raise ValueError("deadline_s must be positive")
    return time.monotonic() + deadline_s


def api_repr(cls_name: str, core: BaseCore) -> str:
    targets = ", ".join(str(e) for e in core.endpoints)
    return f"{cls_name}({targets!r})" if len(core.endpoints) == 1 else f"{cls_name}([{targets}])"
