"""Prometheus metrics of the reward service (prefix ``rlhf_reward_``), one registry per server."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
_SCORES = tuple(x / 2 for x in range(-20, 21))  # -10 .. 10 in steps of 0.5


class RewardMetrics:
    """Every metric the reward service exports; also the batcher's observer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rlhf_reward_requests",
            "Requests by transport, method and status.",
            ["transport", "method", "status"],
            registry=r,
        )
        self.items = Counter("rlhf_reward_items", "Items scored, by outcome.", ["outcome"], registry=r)
        self.queue_depth = Gauge(
            "rlhf_reward_queue_depth",
            "Items admitted and not yet in a batch, including those still being tokenized (autoscaling signal).",
            registry=r,
        )
        self.in_flight = Gauge("rlhf_reward_requests_in_flight", "Requests being handled.", registry=r)
        self.batch_size = Histogram("rlhf_reward_batch_size", "Items per batch.", buckets=_SIZES, registry=r)
        self.batch_tokens = Histogram(
            "rlhf_reward_batch_tokens", "Padded tokens per batch.", buckets=_TOKENS, registry=r
        )
        self.padding_ratio = Histogram(
            "rlhf_reward_padding_ratio",
            "Share of a batch's tokens that are padding.",
            buckets=(0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
            registry=r,
        )
        # Token positions the forward passes run: a shared prefix counts once (see prefix_tokens_saved).
        self.padded_tokens = Counter("rlhf_reward_padded_tokens", "Padded tokens run.", registry=r)
        self.real_tokens = Counter("rlhf_reward_real_tokens", "Real (unpadded) tokens run.", registry=r)
        self.prefix_tokens_saved = Counter(
            "rlhf_reward_prefix_tokens_saved",
            "Tokens not run again because items of one prompt shared their common prefix (KV cache).",
            registry=r,
        )
        self.queue_seconds = Histogram(
            "rlhf_reward_queue_seconds", "Time an item waited for its batch.", buckets=_SECONDS, registry=r
        )
        self.inference_seconds = Histogram(
            "rlhf_reward_inference_seconds", "Forward pass time per batch.", buckets=_SECONDS, registry=r
        )
        self.refused_over_budget = Counter(
            "rlhf_reward_requests_over_token_budget",
            "Requests refused because their tokens after truncation exceed --max-request-tokens.",
            registry=r,
        )
        self.truncations = Counter("rlhf_reward_truncations", "Items truncated to the maximum length.", registry=r)
        self.scores = Histogram(
            "rlhf_reward_score",
            "Raw scores returned (watch for reward drift or hacking).",
            buckets=_SCORES,
            registry=r,
        )
        self.ready = Gauge("rlhf_reward_ready", "1 when the model is loaded and warm.", registry=r)

    # BatchObserver
    def on_queue_depth(self, items: int) -> None:
        self.queue_depth.set(items)

    def on_batch(
        self,
        *,
        items: int,
        padded_tokens: int,
        real_tokens: int,
        queue_seconds: Sequence[float],
        prefix_tokens_saved: int = 0,
    ) -> None:
        self.batch_size.observe(items)
        self.batch_tokens.observe(padded_tokens)
        self.padded_tokens.inc(padded_tokens)
        self.real_tokens.inc(real_tokens)
        if prefix_tokens_saved:
            self.prefix_tokens_saved.inc(prefix_tokens_saved)
        if padded_tokens:
            self.padding_ratio.observe(1.0 - real_tokens / padded_tokens)
        for s in queue_seconds:
            self.queue_seconds.observe(s)

    def on_inference(self, seconds: float) -> None:
        self.inference_seconds.observe(seconds)

    def on_request(self, transport: str, method: str, status: str) -> None:
        self.requests.labels(transport, method, status).inc()
