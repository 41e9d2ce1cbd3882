"""The one check of an HTTP error body: ``{"error": {"code", "message", "item"?}}`` with a status."""

from __future__ import annotations

from typing import Any

import httpx


def assert_error(
    r: httpx.Response, status: int, code: str, item: int | None = None, *, says: str = ""
) -> dict[str, Any]:
    """``r`` is an error of ``status`` with error code ``code`` (and offending ``item``, and a message
    containing ``says``); its body's ``error``."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert says in body["error"]["message"], body
    if item is None:
        assert "item" not in body["error"], body
    else:
        assert body["error"]["item"] == item, body
    return dict(body["error"])
