"""OpenRLHF's own reward call (0.11.2, ``openrlhf.utils.agent.SingleTurnAgentExecutor``, installed from
requirements-frameworks.txt) against live reward services: 1, 2 and 4 endpoints, the ready
``reward_func`` file, the server-side rule hook and squashed scores.

Only the policy's generation is a stand-in (a scripted engine with vLLM's ``generate`` shape: the
executor awaits ``llm_engine.generate(prompt_ids, params)`` and reads ``outputs[0].token_ids``,
``finish_reason`` and ``logprobs``); tokenization, decoding, sharding over endpoints, the HTTP
posts, retries and reading the answer are OpenRLHF's code.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from clients.integrations import openrlhf_reward_func
from clients.integrations.openrlhf import main as openrlhf_main
from clients.integrations.openrlhf import remote_url, reward_func_path
from clients.integrations.rules import exact_match, final_answer
from tests.support.servers import BackgroundLoop, RewardServer, start_reward_server
from tests.support.tiny_causal import make_tiny_causal_llama

agent = pytest.importorskip("openrlhf.utils.agent", reason="OpenRLHF comes from requirements-frameworks.txt")

pytestmark = pytest.mark.slow

SAMPLES = [  # (user turn, generated answer, label)
    ("What is 2+2?", "4", "4"),
    ("Capital of France?", "Paris", "Lyon"),
    ("Say hi", "hi there", None),
    ("What is 3+3?", "The answer is\n6", "6"),
    ("Name a colour", "blue", "red"),
    ("What is 1+1?", "2", "2"),
]


class ScriptedEngine:
    """The policy: answers each prompt with its scripted completion (vLLM's output shape)."""

    def __init__(self, tokenizer: Any, answers: dict[str, str]) -> None:
        self.tokenizer = tokenizer
        self.answers = answers

    async def generate(self, prompt_ids: list[int], params: Any, multi_modal_data: Any = None) -> Any:
        prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        answer = next(a for user, a in self.answers.items() if user in prompt)
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        out = SimpleNamespace(token_ids=ids, finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[out])


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tiny_causal_llama(tmp_path_factory.mktemp("policy")))


@pytest.fixture(scope="module")
def replicas(bg: BackgroundLoop) -> Iterator[list[RewardServer]]:
    servers = [start_reward_server(bg) for _ in range(4)]
    yield servers
    for s in servers:
        s.stop()


def get_reward_calls(server: RewardServer) -> float:
    return sum(
        s.value
        for metric in server.engine.metrics.registry.collect()
        for s in metric.samples
        if s.name == "rlhf_reward_requests_total" and s.labels.get("method") == "get_reward"
    )


def run_rollouts(executor: Any, policy: Any) -> list[dict[str, Any]]:
    """OpenRLHF's executor on every sample, as its vLLM actor runs them (concurrently)."""
    engine = ScriptedEngine(policy, {user: answer for user, answer, _ in SAMPLES})
    params = SimpleNamespace(max_tokens=32, logprobs=None)

    async def all_samples() -> list[dict[str, Any]]:
        prompts = [
            policy.apply_chat_template([{"role": "user", "content": u}], tokenize=False, add_generation_prompt=True)
            for u, _, _ in SAMPLES
        ]
        return await asyncio.gather(
            *(
                executor.execute(p, label, params, 256, policy, engine)
                for p, (_, _, label) in zip(prompts, SAMPLES, strict=True)
            )
        )

    return asyncio.run(all_samples())


def query_of(output: dict[str, Any], policy: Any) -> str:
    return str(policy.decode(output["observation_tokens"], skip_special_tokens=False))


@pytest.mark.parametrize("n_endpoints", [1, 2, 4])
def test_openrlhf_agent_gets_a_reward_for_every_sample(
    n_endpoints: int, replicas: list[RewardServer], policy: Any
) -> None:
    used = replicas[:n_endpoints]
    before = [get_reward_calls(s) for s in used]
    urls = [remote_url(s.url("http")) for s in used]
    executor = agent.SingleTurnAgentExecutor(remote_rm_url=urls[0] if n_endpoints == 1 else urls)
    outputs = run_rollouts(executor, policy)

    for out in outputs:
        assert out["reward"] is not None, "OpenRLHF got no reward for a sample"
        want = used[0].expected({"text": query_of(out, policy)})
        assert out["reward"] == pytest.approx([want], abs=1e-6)
        assert out["scores"] == out["reward"]  # raw by default
        assert out["extra_logs"]["rm_num_tokens"][0] > 0
    # OpenRLHF rotates over its endpoints: every replica answered some of the samples
    calls = [get_reward_calls(s) - b for s, b in zip(used, before, strict=True)]
    assert sum(calls) == len(SAMPLES)
    assert all(c >= 1 for c in calls), calls


def test_an_empty_query_list_is_answered_with_empty_lists(replicas: list[RewardServer]) -> None:
    # OpenRLHF 0.11.0 sends {"query": []} to every endpoint but the first; 0.11.2 skips them
    r = httpx.post(remote_url(replicas[1].url("http")), json={"query": [], "prompts": [], "labels": []}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"rewards": [], "scores": [], "extra_logs": {"rm_num_tokens": [], "rm_truncated": []}}


def test_server_rule_hook_mixes_labels_into_the_reward(bg: BackgroundLoop, policy: Any) -> None:
    server = start_reward_server(
        bg, openrlhf_rule="clients.integrations.rules:exact_match", openrlhf_rm_weight=0.5, openrlhf_rule_weight=2.0
    )
    try:
        executor = agent.SingleTurnAgentExecutor(remote_rm_url=remote_url(server.url("http"), scores="sigmoid"))
        outputs = run_rollouts(executor, policy)
    finally:
        server.stop()
    for out, (_, answer, label) in zip(outputs, SAMPLES, strict=True):
        rm = server.expected({"text": query_of(out, policy)})
        rule = 1.0 if label is not None and answer.splitlines()[-1] == label else 0.0
        assert out["extra_logs"]["rm_score"] == pytest.approx([rm], abs=1e-6)
        assert out["extra_logs"]["rule_reward"] == [rule]
        assert out["reward"] == pytest.approx([0.5 * rm + 2.0 * rule], abs=1e-6)  # rewards stay raw
        assert out["scores"] == pytest.approx([1 / (1 + math.exp(-(0.5 * rm + 2.0 * rule)))], abs=1e-9)
    assert [o["extra_logs"]["rule_reward"][0] for o in outputs] == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]


def test_ready_reward_func_file(monkeypatch: pytest.MonkeyPatch, replicas: list[RewardServer], policy: Any) -> None:
    urls = ",".join(s.url("http") for s in replicas[:2])
    monkeypatch.setenv("RLHF_FEEDBACK_REWARD_URL", urls)
    monkeypatch.setenv("RLHF_FEEDBACK_RULE", "clients.integrations.rules:exact_match")
    monkeypatch.setenv("RLHF_FEEDBACK_SCORES", "sigmoid")
    openrlhf_reward_func.reset()
    try:
        # OpenRLHF loads any --reward.remote_url ending in .py as a file and calls its reward_func
        executor = agent.SingleTurnAgentExecutor(remote_rm_url=reward_func_path())
        assert executor.reward_func is not None
        outputs = run_rollouts(executor, policy)
    finally:
        openrlhf_reward_func.reset()
    for out, (_, answer, label) in zip(outputs, SAMPLES, strict=True):
        rm = replicas[0].expected({"text": query_of(out, policy)})
        rule = 1.0 if label is not None and answer.splitlines()[-1] == label else 0.0
        assert out["reward"] == pytest.approx([rm + rule], abs=1e-6)
        assert out["scores"] == pytest.approx([1 / (1 + math.exp(-(rm + rule)))], abs=1e-9)


def test_ready_reward_func_raises_rather_than_inventing_a_reward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLHF_FEEDBACK_REWARD_URL", "http://127.0.0.1:9")  # nothing listens
    openrlhf_reward_func.reset()
    try:
        with pytest.raises(Exception, match=r"UNAVAILABLE|connect|refused"):
            openrlhf_reward_func.reward_func(["q"], ["p"], [None])
    finally:
        openrlhf_reward_func.reset()


def test_rule_and_url_helpers(capsys: pytest.CaptureFixture[str]) -> None:
    assert final_answer("The answer is\n 6 <|im_end|>\n") == "6"
    assert exact_match(query="", prompt="", label=" 6 ", response="so\n6</s>") == 1.0
    assert exact_match(query="", prompt="", label=None, response="6") == 0.0
    assert remote_url("http://rm:8000", scores="sigmoid") == "http://rm:8000/get_reward?scores=sigmoid"
    openrlhf_main(["--reward-func-path"])
    path = capsys.readouterr().out.strip()
    assert Path(path).is_file() and path.endswith("openrlhf_reward_func.py")
