"""OpenRLHF: point ``--reward.remote_url`` (``--remote_rm_url`` before OpenRLHF's grouped flags)
at the reward service's ``/get_reward`` route. Nothing of ours runs inside the trainer::

    rlhf-feedback serve reward --model /models/my-rm --host 0.0.0.0 --http-port 8000
    python -m openrlhf.cli.train_ppo_ray ... --reward.remote_url http://reward-host:8000/get_reward

What OpenRLHF sends and reads (``openrlhf/utils/remote_rm_utils.py`` and
``openrlhf/trainer/ppo_utils/experience_maker.py``): a JSON POST ``{"query": [...], "prompts":
[...], "labels": [...]}`` where each query is the decoded prompt + response with the policy's
special tokens (``tokenizer.batch_decode(..., skip_special_tokens=False)`` after removing the
padding); no API key header; any failure retried 5 times, 1 s apart. It reads ``rewards`` (one
number per query), ``scores`` (dynamic filtering) and every list in ``extra_logs``.

The service scores each query verbatim as a ``{"text": ...}`` item (tokenized with
``add_special_tokens=False``), so the policy's chat format must be the reward model's: serve a
reward model trained on the same template (e.g. ChatML for a Qwen policy). A runtime failure of
any item fails the whole request with its status (OpenRLHF retries); it is never a zero.
``/get_reward`` is unauthenticated on OpenRLHF's side: run such a service without
``--api-key-file`` on a private network.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

ROUTE = "/get_reward"


def remote_url(base: str) -> str:
    """The value for ``--reward.remote_url``: ``http://host:8000`` → ``http://host:8000/get_reward``.

    Only HTTP(S) works (OpenRLHF posts JSON with ``requests``); a URL that already ends in
    ``/get_reward`` is returned unchanged.
    """
    parts = urlsplit(base.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"OpenRLHF needs an http(s)://host:port URL of the reward service, got {base!r}")
    path = parts.path.rstrip("/")
    if not path.endswith(ROUTE):
        path += ROUTE
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


__all__ = ["ROUTE", "remote_url"]
