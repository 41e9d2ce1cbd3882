"""``rlhf-feedback train ppo`` on a tiny causal LM against a local stand-in of the reward service.

The stand-in speaks the reward service's HTTP contract (``GET /v1/models``, ``POST /v1/score``)
through the real client, with an artificial latency per call so that the overlap of scoring and
generation is measurable. Its reward favours one token: the score of a response is the share of
its characters that belong to occurrences of the target token's text ("tan", a token the tiny
random policy samples now and then: about 5% of its tokens at the start).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhf_train.ppo import checkpoint
from rlhf_train.ppo.config import PPOConfig, PPOInputError
from rlhf_train.ppo.log import read_log
from rlhf_train.ppo.losses import gae, masked_whiten, policy_loss, token_rewards, value_loss, whiten_scores
from rlhf_train.ppo.trainer import run_ppo
from tests.support.tiny_causal import make_tiny_causal_llama

TARGET = "tan"  # the favoured token's text


class _Server(ThreadingHTTPServer):
    request_queue_size = 64  # the judge client opens several connections at once
    daemon_threads = True


class RewardStandIn:
    """A reward service stand-in on 127.0.0.1 (threaded HTTP server)."""

    def __init__(self, tokenizer: Any, *, latency_s: float, fail_every: int = 0) -> None:
        assert len(tokenizer(TARGET, add_special_tokens=False)["input_ids"]) == 1, "the target is one token"
        self.latency_s = latency_s
        self.fail_every = fail_every  # every n-th item (counting over the run) gets an error result
        self.items = 0
        self.calls: list[list[float | None]] = []  # each /v1/score call's scores, None for an error
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                limits = {"max_items_per_request": 4096, "max_body_bytes": 1 << 26, "max_text_bytes": 1 << 18}
                self._send({"object": "list", "data": [{"id": "stand-in", "revision": "1", "limits": limits}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(stand_in.latency_s)
                if self.path == "/v1/grade":  # the judge's contract
                    r = stand_in.result({"prompt": body["prompt"], "response": body["response"]})
                    self._send({"score": r["score"]} if "score" in r else {"abstain": {"reason": "stand-in abstains"}})
                    return
                results = [stand_in.result(x) for x in body["inputs"]]
                with stand_in.lock:
                    stand_in.calls.append([r.get("score") for r in results])
                self._send({"model": {"id": "stand-in", "revision": "1"}, "results": results})

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def score(self, response: str) -> float:
        return len(TARGET) * response.count(TARGET) / max(len(response), 1)

    def result(self, item: dict[str, Any]) -> dict[str, Any]:
        assert isinstance(item["prompt"], list) and item["prompt"][0]["role"] == "user"
        with self.lock:
            self.items += 1
            n = self.items
        if self.fail_every and n % self.fail_every == 0:
            return {"error": {"code": "DEADLINE_EXCEEDED", "message": "stand-in: too late"}}
        return {"score": self.score(item["response"]), "num_tokens": 1, "truncated": False}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_causal_llama(tmp_path_factory.mktemp("tiny-policy"), max_position=128)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [
        {"prompt": "How do I bake bread?"},
        {"prompt": [{"role": "user", "content": "What is the capital of France?"}]},
        {"prompt": "Tell me about the quick brown fox."},
        {"prompt": "Numbers and punctuation matter."},
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


@pytest.fixture
def stand_in(policy_dir: Path) -> Iterator[Any]:
    """A factory of stand-ins, closed after the test."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    made: list[RewardStandIn] = []

    def make(latency_s: float = 0.02, fail_every: int = 0) -> RewardStandIn:
        made.append(RewardStandIn(tok, latency_s=latency_s, fail_every=fail_every))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _cfg(policy_dir: Path, prompts: Path, out: Path, url: str | None, **kw: Any) -> PPOConfig:
    base: dict[str, Any] = dict(
        prompts=prompts,
        out=out,
        reward_url=url,
        policy=policy_dir,
        steps=12,
        batch_size=16,
        minibatch_size=4,
        ppo_epochs=2,
        lr=1e-4,
        kl_coef=0.01,
        max_new_tokens=16,
        seed=0,
        threads=1,
        save_every=0,
        quiet=True,
    )
    base.update(kw)
    return PPOConfig(**base)


@pytest.mark.slow  # 1-2 s
def test_reward_rises_kl_finite_and_scoring_hidden(policy_dir, prompts_file, stand_in, tmp_path):
    server = stand_in(latency_s=0.1)
    summary = run_ppo(_cfg(policy_dir, prompts_file, tmp_path / "run", server.url, max_new_tokens=24, steps=15))
    recs = summary.records
    assert [r.step for r in recs] == list(range(1, 16))
    rewards = [r.reward_mean for r in recs if r.reward_mean is not None]
    assert len(rewards) == 15
    print("rewards", [round(x, 3) for x in rewards])
    early, late = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert late > early + 0.15, rewards
    assert all(r.kl is not None and math.isfinite(r.kl) for r in recs)
    assert (recs[-1].kl or 0.0) > 0.0  # the policy moved away from the reference, by a finite amount
    assert all(math.isfinite(r.entropy) and math.isfinite(r.value_loss or 0.0) for r in recs)
    score_s, wait_s = sum(r.score_s for r in recs), sum(r.wait_s for r in recs)
    print(f"score_s {score_s:.2f} wait_s {wait_s:.2f}", [round(r.generate_s + r.train_s, 3) for r in recs])
    assert score_s >= 15 * 0.1
    assert wait_s < 0.5 * score_s
    logged = read_log(tmp_path / "run" / "log.jsonl")
    assert [r["step"] for r in logged] == list(range(1, 16))
    for key in ("reward_mean", "reward_std", "kl", "entropy", "clip_frac", "value_loss", "policy_loss", "dropped",
                "generate_s", "score_s", "wait_s", "train_s", "response_len_mean"):  # fmt: skip
        assert key in logged[0], key


def test_a_missing_score_drops_its_sample_and_is_counted(policy_dir, prompts_file, stand_in, tmp_path):
    server = stand_in(fail_every=5)  # items 5, 10, 15, ... of the run get an error result
    summary = run_ppo(_cfg(policy_dir, prompts_file, tmp_path / "run", server.url, steps=3, batch_size=8))
    assert len(server.calls) == 3
    for rec, call in zip(summary.records, server.calls, strict=True):
        got = [s for s in call if s is not None]
        assert rec.dropped == call.count(None) > 0
        assert rec.samples == 8
        # The mean is over the scored samples only: a None never counts as 0.
        assert rec.reward_mean == pytest.approx(sum(got) / len(got))
        assert rec.drop_reasons == {"DEADLINE_EXCEEDED: stand-in: too late": rec.dropped}
        assert not rec.skipped and rec.policy_loss is not None
    assert [r["dropped"] for r in read_log(tmp_path / "run" / "log.jsonl")] == [r.dropped for r in summary.records]


def test_a_batch_without_scores_is_skipped_and_the_job_stops(policy_dir, prompts_file, stand_in, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf_train.ppo.config import PPOError

    server = stand_in(fail_every=1)  # no item ever gets a score
    with pytest.raises(PPOError, match="no scores for 2 batches in a row"):
        run_ppo(_cfg(policy_dir, prompts_file, tmp_path / "run", server.url, steps=5, max_empty_batches=2))
    logged = read_log(tmp_path / "run" / "log.jsonl")
    assert [(r["step"], r["skipped"], r["dropped"], r["reward_mean"]) for r in logged] == [
        (1, True, 16, None),
        (2, True, 16, None),
    ]
    assert checkpoint.latest(tmp_path / "run") is None  # nothing was trained, nothing saved
    # And no update happened: a direct call leaves every parameter as it was.
    from rlhf_train.ppo.scoring import Scores
    from rlhf_train.ppo.trainer import ppo_update

    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    assert ppo_update(None, Scores([None, None]), policy=model, value_head=None, optimizer=opt,  # type: ignore[arg-type]
                      cfg=_cfg(policy_dir, prompts_file, tmp_path, server.url), step=1) is None  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_judge_grade_as_reward(policy_dir, prompts_file, stand_in, tmp_path):
    server = stand_in(fail_every=4)  # every 4th grade is an abstention
    cfg = _cfg(policy_dir, prompts_file, tmp_path / "run", None, judge_url=server.url, steps=2, batch_size=8)
    summary = run_ppo(cfg)
    assert [r.dropped for r in summary.records] == [2, 2]
    assert all(r.drop_reasons == {"abstain: stand-in abstains": 2} for r in summary.records)
    assert all(0.0 <= (r.reward_mean or 0.0) <= 1.0 and r.kl is not None for r in summary.records)


def _params(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow  # 1-2 s
def test_checkpoint_resume_continues_exactly(policy_dir, prompts_file, stand_in, tmp_path):
    from transformers import AutoModelForCausalLM

    server = stand_in()
    kw: dict[str, Any] = dict(steps=4, batch_size=8, save_every=2, keep_checkpoints=3)
    straight = run_ppo(_cfg(policy_dir, prompts_file, tmp_path / "a", server.url, **kw))
    saved = sorted(p.name for p in checkpoint.checkpoints_dir(tmp_path / "a").iterdir())
    assert saved == ["step-000002", "step-000004"]
    final = checkpoint.latest(tmp_path / "a")
    assert final is not None and straight.checkpoint == final
    reloaded = AutoModelForCausalLM.from_pretrained(final / "policy")
    want = _params(straight.policy)
    assert all(torch.equal(want[k], v) for k, v in reloaded.state_dict().items())
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["cursor"] == 32 and state["policy_source"] == str(policy_dir)
    assert torch.equal(torch.load(final / "value_head.pt")["weight"], straight.value_head.weight.detach())

    # A run killed during step 3 (after its log line, before any checkpoint of step 3) ...
    class Killed(Exception):
        pass

    def kill_at_3(rec: Any) -> None:
        if rec.step == 3:
            raise Killed

    with pytest.raises(Killed):
        run_ppo(_cfg(policy_dir, prompts_file, tmp_path / "b", server.url, **kw), on_step=kill_at_3)
    assert checkpoint.latest(tmp_path / "b") == tmp_path / "b" / "checkpoints" / "step-000002"
    with pytest.raises(PPOInputError, match="--resume"):  # never overwrite a run by accident
        run_ppo(_cfg(policy_dir, prompts_file, tmp_path / "b", server.url, **kw))
    # ... and resumed: it continues at step 3 and ends where the uninterrupted run ended.
    resumed = run_ppo(_cfg(policy_dir, prompts_file, tmp_path / "b", server.url, resume=True, **kw))
    assert resumed.start_step == 2 and [r.step for r in resumed.records] == [3, 4]
    got = _params(resumed.policy)
    assert all(torch.allclose(want[k], got[k], atol=1e-6, rtol=0) for k in want), "resume is not exact"
    rewards = [r.reward_mean for r in straight.records]
    assert [r.reward_mean for r in resumed.records] == pytest.approx(rewards[2:], abs=1e-9)
    logged = read_log(tmp_path / "b" / "log.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3, 4]  # step 3 of the killed run is not there twice
    # Resuming a finished run does nothing.
    again = run_ppo(_cfg(policy_dir, prompts_file, tmp_path / "b", server.url, resume=True, **kw))
    assert again.records == [] and again.final_step == 4


def test_losses_by_hand() -> None:
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logp = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, -5.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-1.0, -2.0, -9.0]])
    rewards, kl = token_rewards(torch.tensor([1.0, 2.0]), logp, ref, mask, kl_coef=0.1)
    # -0.1 * (logp - ref) everywhere, the score on the last real token, nothing after it.
    assert rewards.flatten().tolist() == pytest.approx([-0.05, 0.0, 1.0, 0.0, 2.0 - 0.1, 0.0])
    assert kl.sum(dim=1).tolist() == pytest.approx([0.5, 1.0])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 9.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Row 2 by hand: delta_1 = 1.9 - 0.4; delta_0 = 0 + 0.9 * 0.4 - 0.3; A_0 = delta_0 + 0.72 * A_1.
    a1 = 1.9 - 0.4
    a0 = 0.9 * 0.4 - 0.3 + 0.72 * a1
    assert adv[1].tolist() == pytest.approx([a0, a1, 0.0])
    assert ret[1].tolist() == pytest.approx([a0 + 0.3, a1 + 0.4, 0.0])
    w = masked_whiten(adv, mask)
    assert float((w * mask).sum()) == pytest.approx(0.0, abs=1e-5) and float(w[1, 2]) == 0.0
    # Clipped policy loss: ratios e^{0.5} (clipped for A > 0) and 1.
    old = torch.tensor([[-1.5, -2.0, -1.0]])
    pl = policy_loss(torch.tensor([[-1.0, -2.0, -1.0]]), old, torch.ones(1, 3), torch.ones(1, 3), cliprange=0.2)
    assert float(pl.loss) == pytest.approx(-(1.2 + 1 + 1) / 3)
    assert pl.clip_frac == pytest.approx(1 / 3)
    white = whiten_scores(torch.tensor([1.0, 2.0, 3.0]))
    assert white.tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    assert whiten_scores(torch.tensor([5.0])).tolist() == [0.0]
    vl = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    assert float(vl.loss) == pytest.approx(0.5 * (2.0 - 0.2) ** 2) and vl.clip_frac == 1.0


def test_cli_help_and_bad_input(policy_dir, prompts_file, stand_in, tmp_path, capsys):
    from rlhf_feedback.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "ppo", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--reward-url", "--judge-url", "--ppo-epochs", "--kl-coef", "--whiten-rewards", "--resume"):
        assert flag in help_text

    url = stand_in().url
    common = ["train", "ppo", "--policy", str(policy_dir), "--out", str(tmp_path / "o"), "--threads", "1"]
    cases = [
        (["--prompts", str(tmp_path / "missing.jsonl"), "--reward-url", url], "no such file"),
        (["--prompts", str(prompts_file), "--reward-url", url, "--judge-url", url], "exactly one reward source"),
        (["--prompts", str(prompts_file)], "exactly one reward source"),
        (["--prompts", str(prompts_file), "--reward-url", url, "--steps", "0"], "--steps must be at least 1"),
        (["--prompts", str(prompts_file), "--reward-url", url, "--lam", "2"], "--lam"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n', encoding="utf-8")
    cases.append((["--prompts", str(bad), "--reward-url", url], "line 1"))
    for extra, message in cases:
        assert main(common + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit) as e:
        main([*common, "--prompts", str(prompts_file), "--reward-url", url, "--lr", "fast"])
    assert e.value.code == 2


def test_cli_runs_and_resumes(policy_dir, prompts_file, stand_in, tmp_path, capsys):
    from rlhf_feedback.cli import main

    url = stand_in().url
    args = ["train", "ppo", "--policy", str(policy_dir), "--prompts", str(prompts_file), "--reward-url", url,
            "--out", str(tmp_path / "o"), "--batch-size", "4", "--max-new-tokens", "8", "--threads", "1",
            "--quiet"]  # fmt: skip
    assert main([*args, "--steps", "2"]) == 0
    assert "train ppo: steps 1..2" in capsys.readouterr().out
    assert main([*args, "--steps", "3", "--resume"]) == 0
    assert "train ppo: steps 3..3" in capsys.readouterr().out
    assert [r["step"] for r in read_log(tmp_path / "o" / "log.jsonl")] == [1, 2, 3]
    assert main([*args, "--steps", "3"]) == 2  # checkpoints there and no --resume


def test_rollout_logprobs_are_the_sampling_distribution(policy_dir):
    """The stored "old" log-probabilities (one forward pass over prompt + response, left padding,
    only the response's logits) equal those ``generate`` sampled from, token for token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rlhf_train.ppo.rollout import Tokens, forward, generate_rollout, make_value_head

    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    tokens = Tokens(tok, max_prompt_tokens=64)
    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "What is the capital of France?"}]]
    ids, am = tokens.encode(prompts)
    assert am[0, 0] == 0 and am[1].all()  # the short prompt is padded on the left
    torch.manual_seed(0)
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=10, min_new_tokens=10,
                              pad_token_id=tokens.pad_id, eos_token_id=tok.eos_token_id, output_scores=True,
                              return_dict_in_generate=True)  # fmt: skip
    p = ids.shape[1]
    with torch.inference_mode():
        g = model.generate(input_ids=ids, attention_mask=am, generation_config=config)
        sampled = torch.log_softmax(torch.stack(g.scores, 1).float(), -1).gather(-1, g.sequences[:, p:, None])[..., 0]
        full_mask = torch.cat([am, torch.ones_like(g.sequences[:, p:])], 1)
        ours = forward(model, g.sequences, full_mask, p, temperature=0.7).logprobs
    assert torch.allclose(ours, sampled, atol=1e-3)

    rollout = generate_rollout(model, model, make_value_head(64), tokens, prompts, max_new_tokens=6, temperature=0.7)
    assert rollout.mask.shape == (2, rollout.input_ids.shape[1] - rollout.prompt_len)
    assert torch.equal(rollout.old_logprobs, rollout.ref_logprobs)  # the same model: no KL
    assert len(rollout.responses) == 2 and rollout.generate_s > 0


def test_a_response_ends_at_its_first_eos(policy_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_train.ppo.rollout import Tokens, generate_rollout, make_value_head

    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    stop = tok.convert_tokens_to_ids("į")  # a token this policy samples often: a second eos makes stops common
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    tokens = Tokens(tok, max_prompt_tokens=64)
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(8)]
    torch.manual_seed(0)
    r = generate_rollout(model, model, make_value_head(64), tokens, prompts, max_new_tokens=16, temperature=1.0)
    response = r.input_ids[:, r.prompt_len :]
    lengths = r.mask.sum(dim=1).long().tolist()
    assert min(lengths) < 16, "no response stopped early: the test shows nothing"
    for i, n in enumerate(lengths):
        assert r.mask[i, :n].all() and not r.mask[i, n:].any()  # one contiguous span from the start
        if n < 16:
            assert int(response[i, n - 1]) in (stop, tok.eos_token_id)  # the eos itself is trained on
            assert (response[i, n:] == tokens.pad_id).all()
        assert not any(int(t) in (stop, tok.eos_token_id) for t in response[i, : n - 1])
        assert torch.equal(r.attention_mask[i, r.prompt_len :], r.mask[i].long())
        assert (r.old_logprobs[i, n:] == 0).all() and (r.values[i, n:] == 0).all()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_against_the_real_reward_service_over_http_and_grpc(
    policy_dir, prompts_file, tiny_llama_dir, tmp_path_factory, tmp_path
):
    """The real ``serve reward`` (the tiny Llama reward model) as the reward source, by either transport."""
    from clients.process import ServerProcess

    log = tmp_path_factory.mktemp("reward") / "reward.log"
    with ServerProcess.reward(
        ["--model", str(tiny_llama_dir), "--threads", "1", "--drain-seconds", "1", "--log-level", "warning"],
        log_path=log,
    ) as srv:
        srv.wait_ready(120)
        for name, url in (("http", srv.http_url), ("grpc", f"grpc://{srv.grpc_target}")):
            cfg = _cfg(policy_dir, prompts_file, tmp_path / name, url, steps=2, batch_size=4, max_new_tokens=8)
            recs = run_ppo(cfg).records
            assert [r.dropped for r in recs] == [0, 0], name
            # Raw reward-model logits (the tiny model's head is N(0, 1)): not clipped to [0, 1], not all equal.
            assert all(r.reward_std is not None and r.reward_std > 0 for r in recs), name
            assert all(r.kl is not None and math.isfinite(r.kl) for r in recs), name
