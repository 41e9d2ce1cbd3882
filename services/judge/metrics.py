"""Prometheus metrics of the judge service (prefix ``rlhf_judge_``), one registry per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class JudgeMetrics:
    """Every metric the judge service exports. The engine and the transports call the ``on_*`` hooks."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rlhf_judge_requests", "Requests by transport, method and status.", ["transport", "method", "status"],
            registry=r,
        )  # fmt: skip
        self.upstream_requests = Counter(
            "rlhf_judge_upstream_requests",
            "Calls to the judge provider (every attempt, retries included), by status: ok, rate_limited, "
            "error_<http status>, timeout, unparseable, error.",
            ["status"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "rlhf_judge_upstream_seconds", "Time per provider call.", buckets=_SECONDS, registry=r
        )
        self.rate_limited = Counter(
            "rlhf_judge_rate_limited", "Provider answers that said 'rate limited' (429 and the like).", registry=r
        )
        self.limiter_waits = Counter(
            "rlhf_judge_limiter_waits", "Calls that had to wait for the service's own rpm/tpm limiter.", registry=r
        )
        self.concurrency_limit = Gauge(
            "rlhf_judge_concurrency_limit", "Current provider concurrency limit (AIMD).", registry=r
        )
        self.cache = Counter(
            "rlhf_judge_cache", "Verdict cache lookups, by result: hit or miss.", ["result"], registry=r
        )
        self.abstentions = Counter("rlhf_judge_abstentions", "Judgments abstained, by reason.", ["reason"], registry=r)
        self.tokens = Counter("rlhf_judge_tokens", "Provider tokens used, by kind: prompt or completion.", ["kind"],
                              registry=r)  # fmt: skip
        self.cost = Counter("rlhf_judge_cost_usd", "Provider cost in USD (from the price table).", registry=r)
        self.position_consistency = Counter(
            "rlhf_judge_position_consistency",
            "Both-order comparisons by outcome: consistent (both orders pick the same winner) or inconsistent.",
            ["outcome"],
            registry=r,
        )
        self.first_position = Counter(
            "rlhf_judge_first_position",
            "Single-order verdicts by whether the response shown first won (first) or not (second); "
            "first / (first + second) is the first-position rate.",
            ["outcome"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "rlhf_judge_queue_depth", "Provider calls admitted and not finished (autoscaling signal).", registry=r
        )
        self.upstream_in_flight = Gauge("rlhf_judge_upstream_in_flight", "Provider calls running now.", registry=r)
        self.in_flight = Gauge("rlhf_judge_requests_in_flight", "Requests being handled.", registry=r)
        self.ready = Gauge("rlhf_judge_ready", "1 when the judge backend is loaded and ready.", registry=r)

    def on_request(self, transport: str, method: str, status: str) -> None:
        self.requests.labels(transport, method, status).inc()

    def on_upstream(self, status: str, seconds: float | None = None) -> None:
        self.upstream_requests.labels(status).inc()
        if status == "rate_limited":
            self.rate_limited.inc()
        if seconds is not None:
            self.upstream_seconds.observe(seconds)

    def on_cache(self, hit: bool) -> None:
        self.cache.labels("hit" if hit else "miss").inc()

    def on_abstain(self, reason: str) -> None:
        self.abstentions.labels(reason).inc()

    def on_usage(self, prompt_tokens: int, completion_tokens: int, cost_usd: float) -> None:
        if prompt_tokens:
            self.tokens.labels("prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels("completion").inc(completion_tokens)
        if cost_usd:
            self.cost.inc(cost_usd)

    def on_consistency(self, consistent: bool) -> None:
        self.position_consistency.labels("consistent" if consistent else "inconsistent").inc()

    def on_first_position(self, first_won: bool) -> None:
        self.first_position.labels("first" if first_won else "second").inc()
