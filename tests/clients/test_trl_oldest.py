"""The oldest TRL on PyPI with a GRPOTrainer (0.14.0, with the transformers 4.48 it was released
for) runs a real GRPO step with :class:`RemoteReward` against a live reward service.

trl 0.14 lives in its own ``--target`` directory (``.venv/trl-oldest``, made by ``make install``:
``--no-deps``, no torch of its own) that only the child process puts first on its path. Run as a
script, this file is that child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.servers import RewardServer

OLDEST = Path(os.environ.get("RLHF_TRL_OLDEST", Path(sys.prefix) / "trl-oldest"))
ROOT = Path(__file__).resolve().parents[2]


def child(url: str, policy: str, out: str) -> None:
    import trl
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from clients.integrations import TooManyFailuresError
    from clients.integrations.trl import RemoteReward

    class Recording(RemoteReward):
        def __call__(self, prompts: Any, completions: Any, **kwargs: Any) -> list[float | None]:
            result = super().__call__(prompts, completions, **kwargs)
            self.seen = [*getattr(self, "seen", []), (self.items(prompts, completions), list(result), sorted(kwargs))]
            return result

    rm = Recording(url)
    dataset = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "2+2?"}]]}
    )
    args = GRPOConfig(
        output_dir=str(Path(out).parent / "grpo"),
        max_steps=1,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=8,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        seed=0,
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=[rm], args=args, train_dataset=dataset)
    trainer.train()
    logs = next(h for h in trainer.state.log_history if "rewards/remote_reward" in h)

    # trl 0.14 passes no log_metric and cannot take None: by default a failed item raises
    failed = None
    try:
        RemoteReward(url, template_source="verbatim")(prompts=["", ""], completions=["Hey", "boom"])
    except TooManyFailuresError as exc:
        failed = exc.reasons[1].code
    result = {
        "trl": trl.__version__,
        "trl_file": trl.__file__,
        "step": trainer.state.global_step,
        "logged": logs["rewards/remote_reward"],
        "seen": rm.seen,
        "failed": failed,
    }
    Path(out).write_text(json.dumps(result))


@pytest.mark.slow  # a child interpreter loading torch and transformers
@pytest.mark.timeout(300)
def test_grpo_step_on_the_oldest_trl(tmp_path: Path) -> None:
    if not (OLDEST / "trl").is_dir():
        pytest.skip(f"{OLDEST} is missing: `make install` puts trl 0.14.0 there")
    from clients import RewardClient
    from clients.process import ServerProcess  # noqa: F401 - only to fail early if the project is broken
    from tests.support.servers import BackgroundLoop, start_reward_server
    from tests.support.tiny_causal import make_tiny_causal_llama

    policy = make_tiny_causal_llama(tmp_path / "policy")
    # transformers 5 names its tokenizer class TokenizersBackend; 4.48 knows the same files as
    # PreTrainedTokenizerFast
    config_path = policy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_input_names"] = ["input_ids", "attention_mask"]  # no token_type_ids for generate()
    config_path.write_text(json.dumps(config))
    bg = BackgroundLoop()
    srv: RewardServer = start_reward_server(bg, fail_on_boom=True, max_batch_tokens=1)
    try:
        out = tmp_path / "result.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(OLDEST), str(ROOT)]), "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(
            [sys.executable, "-W", "ignore", __file__, srv.url("http"), str(policy), str(out)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        result = json.loads(out.read_text())
        assert result["trl"] == "0.14.0" and result["trl_file"].startswith(str(OLDEST))
        assert result["step"] == 1
        [(items, scores, kwargs)] = result["seen"]
        assert kwargs == []  # trl 0.14 passes only prompts, completions and the dataset's other columns
        assert len(items) == 4 and all(isinstance(x["prompt"], list) for x in items)
        with RewardClient(srv.url("http")) as client:
            again = [float(x) for x in client.score(items) if x is not None]
        assert scores == pytest.approx(again, abs=1e-5)
        assert result["logged"] == pytest.approx(sum(again) / len(again), abs=1e-4)
        assert result["failed"] == "INTERNAL"
    finally:
        srv.stop()
        bg.close()


if __name__ == "__main__":
    child(*sys.argv[1:4])
