"""``--dtype auto`` and the bf16 warning (services/runtime/device.py).

bf16 is a trap on a CPU without native support (an AVX2-only machine of our kind ran the SmolLM2
load at 0.30 samples/s in bf16 against 2.73 in float32): ``auto`` picks it only where native, and
an explicit ``bfloat16`` there is kept but logged.
"""

from __future__ import annotations

import logging

import pytest
import torch

from services.runtime import device


@pytest.mark.parametrize(("native", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_auto_picks_bf16_only_on_a_cpu_that_has_it(
    monkeypatch: pytest.MonkeyPatch, native: bool, expected: str
) -> None:
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
    assert device.resolve_dtype("auto", torch.device("cpu")) == expected


def test_explicit_bf16_without_native_support_is_kept_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="services.runtime.device"):
        assert device.resolve_dtype("bfloat16", torch.device("cpu")) == "bfloat16"
    assert "without native bf16" in caplog.text and "several times slower" in caplog.text
    caplog.clear()
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level(logging.WARNING, logger="services.runtime.device"):
        assert device.resolve_dtype("bfloat16", torch.device("cpu")) == "bfloat16"
        assert device.resolve_dtype("float32", torch.device("cpu")) == "float32"
    assert caplog.text == ""


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        device.resolve_dtype("int4", torch.device("cpu"))


def test_the_capability_line_names_the_isa_and_bf16() -> None:
    line = device.cpu_capability()
    assert line.startswith(torch.backends.cpu.get_cpu_capability()) and "native bf16: " in line
