"""OpenRLHF: two ways to get the reward service's scores into OpenRLHF's PPO/GRPO trainer.

Tested against OpenRLHF 0.11.2 (its own ``SingleTurnAgentExecutor`` posting to a live service,
``tests/clients/test_openrlhf_framework.py``); the batched payload of 0.9.0 and earlier is tested
as a wire format.

1. **HTTP, nothing of ours in the trainer**: point ``--reward.remote_url`` (``--remote_rm_url``
   before OpenRLHF's grouped flags) at the service's ``/get_reward`` route; several replicas as
   ``a,b,c``::

       rlhf-feedback serve reward --model /models/my-rm --host 0.0.0.0 --http-port 8000
       python -m openrlhf.cli.train_ppo_ray ... --reward.remote_url http://reward-host:8000/get_reward

   Since 0.9.1 OpenRLHF posts one sample per request (``{"query": [q], "prompts": [p], "labels":
   [l]}``) right after its rollout; 0.9.0 and earlier posted a micro-batch. Each query is the
   decoded prompt + response with the policy's special tokens, scored verbatim as a ``text`` item,
   so the policy's chat format must be the reward model's. Labels reach a server-side rule with
   ``serve reward --openrlhf-rule module:function``; ``?scores=sigmoid`` on the URL squashes
   ``scores`` (dynamic filtering's (0, 1) range), ``rewards`` stay raw. OpenRLHF sends no API key:
   run such a service without ``--api-key-file`` on a private network.

2. **A ready reward_func file** (:mod:`clients.integrations.openrlhf_reward_func`): the client runs
   in OpenRLHF's process (HTTP or gRPC, API key, retries, several replicas) and mixes in a rule that
   sees the labels::

       --reward.remote_url "$(python -m clients.integrations.openrlhf --reward-func-path)"

A failure is never a made-up reward: the service fails the request (OpenRLHF retries it 5 times),
the reward_func file raises.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

ROUTE = "/get_reward"


def remote_url(base: str, *, scores: str | None = None) -> str:
    """The value for ``--reward.remote_url``: ``http://host:8000`` → ``http://host:8000/get_reward``.

    ``scores="sigmoid"`` adds ``?scores=sigmoid`` (``scores`` squashed into (0, 1), ``rewards``
    raw). Only HTTP(S) works (OpenRLHF posts JSON); a URL that already ends in ``/get_reward`` keeps
    its path.
    """
    parts = urlsplit(base.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"OpenRLHF needs an http(s)://host:port URL of the reward service, got {base!r}")
    if scores not in (None, "raw", "sigmoid"):
        raise ValueError(f"scores is raw or sigmoid, got {scores!r}")
    path = parts.path.rstrip("/")
    if not path.endswith(ROUTE):
        path += ROUTE
    query = urlencode({"scores": scores}) if scores else parts.query
    return urlunsplit((parts.scheme, parts.netloc, path, query, ""))


def reward_func_path() -> str:
    """The path of the ready ``reward_func`` file, for ``--reward.remote_url``."""
    return str(Path(__file__).with_name("openrlhf_reward_func.py"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m clients.integrations.openrlhf",
        description="Values for OpenRLHF's --reward.remote_url.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--reward-func-path", action="store_true", help="print the path of the ready reward_func file")
    what.add_argument("--url", metavar="BASE", help="print BASE's /get_reward URL (http://host:8000)")
    parser.add_argument("--scores", choices=["raw", "sigmoid"], help="with --url: what `scores` carries")
    args = parser.parse_args(argv)
    print(reward_func_path() if args.reward_func_path else remote_url(args.url, scores=args.scores))


if __name__ == "__main__":
    main()


__all__ = ["ROUTE", "main", "remote_url", "reward_func_path"]
