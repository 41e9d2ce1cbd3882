"""``make demo``: serve the embedded reward model, score example conversations, stop.

Starts ``rlhf-feedback serve reward`` (no --model: SmolLM2-135M-Instruct with the committed
Bradley-Terry head), waits for readiness, scores the chosen and rejected answer of each
conversation in examples/conversations.jsonl over HTTP, prints them, then sends SIGTERM and
checks the server drained and exited 0.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.common.process import ServerProcess  # noqa: E402


def main() -> int:
    rows = [json.loads(line) for line in (ROOT / "examples" / "conversations.jsonl").read_text().splitlines() if line]
    log_path = Path(tempfile.gettempdir()) / "rlhf-feedback-demo-reward.log"
    print("Starting the reward service (first run converts the packaged SmolLM2 weights, ~30 s) ...")
    t0 = time.monotonic()
    with ServerProcess.reward(log_path=log_path) as srv:
        srv.wait_ready()
        print(f"ready in {time.monotonic() - t0:.1f}s at {srv.http_url} (gRPC {srv.grpc_target}); log: {log_path}\n")
        model = httpx.get(srv.http_url + "/v1/models", timeout=10).json()["data"][0]
        inputs = []
        for row in rows:
            inputs.append({"prompt": row["prompt"], "response": row["chosen"]})
            inputs.append({"prompt": row["prompt"], "response": row["rejected"]})
        resp = httpx.post(srv.http_url + "/v1/score", json={"inputs": inputs}, timeout=300)
        resp.raise_for_status()
        body = resp.json()
        results = body["results"]
        wins = 0
        print(f"model {body['model']['id']} (revision {body['model']['revision']}, max_length {model['max_length']})")
        print(f"{'chosen':>8} {'rejected':>9}  prompt")
        for i, row in enumerate(rows):
            chosen, rejected = results[2 * i]["score"], results[2 * i + 1]["score"]
            wins += chosen > rejected
            mark = "ok" if chosen > rejected else "  "
            print(f"{chosen:8.3f} {rejected:9.3f}  {mark} {row['prompt'][-1]['content'][:60]}")
        print(f"\nchosen scored above rejected in {wins} of {len(rows)} conversations (raw logits, no sigmoid)")
        code = srv.terminate()
    print(f"server drained and exited with code {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
