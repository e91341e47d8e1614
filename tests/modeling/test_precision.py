"""Precision (lora.modeling.precision): choose_precision's decision from (mocked) hardware facts,
no GPU needed; the dtype of the frozen base weights."""

from __future__ import annotations

import logging

import pytest

from lora.common.cli import UserError
from lora.modeling.precision import (
    HardwareFacts,
    choose_precision,
    cpu_flags,
    hardware_facts,
    resolve_base_weights_dtype,
)

H100 = HardwareFacts("cuda", "H100", (9, 0), cuda_bf16=True)
V100 = HardwareFacts("cuda", "V100", (7, 0), cuda_bf16=False)
P40 = HardwareFacts("cuda", "P40", (6, 1), cuda_bf16=False)
CPU_AMX = HardwareFacts("cpu", cpu_flags=frozenset({"avx2", "avx512f", "amx_bf16", "amx_tile"}))
CPU_AVX512BF16 = HardwareFacts("cpu", cpu_flags=frozenset({"avx512f", "avx512_bf16"}))
CPU_OLD = HardwareFacts("cpu", cpu_flags=frozenset({"avx2", "avx512f"}))


@pytest.mark.parametrize("facts,requested,mode", [
    (H100, "auto", "bf16"), (V100, "auto", "fp16"), (P40, "auto", "no"),
    (CPU_AMX, "auto", "bf16"), (CPU_AVX512BF16, "auto", "bf16"), (CPU_OLD, "auto", "no"),
    (H100, "fp16", "fp16"), (V100, "fp16", "fp16"),
    (CPU_AMX, "fp16", "bf16"), (CPU_OLD, "fp16", "no"),
    (V100, "bf16", "fp16"), (H100, "bf16", "bf16"), (CPU_OLD, "bf16", "bf16"),
    (H100, "no", "no"), (CPU_AMX, "no", "no"),
])
def test_choice(facts, requested, mode):
    got, reason = choose_precision(requested, facts.device_type, facts)
    assert got == mode
    assert isinstance(reason, str) and len(reason) > 10


def test_cpu_fp16_fallback_warns_and_names_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="lora"):
        mode, reason = choose_precision("fp16", "cpu", CPU_AMX)
    assert mode == "bf16" and "amx_bf16" in reason
    assert any("fp16" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lora"):
        mode, _ = choose_precision("fp16", "cpu", CPU_OLD)
    assert mode == "no" and caplog.records


def test_auto_reason_says_why():
    assert "bf16" in choose_precision("auto", "cuda", H100)[1]
    assert "GradScaler" in choose_precision("auto", "cuda", V100)[1]
    assert "no AMX" in choose_precision("auto", "cpu", CPU_OLD)[1]


def test_cpu_flags_parsing(tmp_path):
    p = tmp_path / "cpuinfo"
    p.write_text("processor\t: 0\nflags\t\t: fpu sse avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert {"avx512_bf16", "amx_tile", "fpu"} <= cpu_flags(p)
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_real_cpu_facts_are_consistent():
    f = hardware_facts("cpu")
    mode, _ = choose_precision("auto", "cpu")
    fast = bool({"amx_bf16", "avx512_bf16"} & set(f.cpu_flags))
    assert mode == ("bf16" if fast else "no")


def test_bad_value():
    with pytest.raises(ValueError):
        choose_precision("fp8", "cpu", CPU_OLD)


def test_base_weights_dtype_choice():
    assert resolve_base_weights_dtype("auto", "bf16")[0] == "bfloat16"
    assert resolve_base_weights_dtype("auto", "no")[0] == "float32"
    assert resolve_base_weights_dtype("auto", "fp16")[0] == "float32"
    assert resolve_base_weights_dtype("float32", "bf16")[0] == "float32"
    assert resolve_base_weights_dtype("bfloat16", "bf16")[0] == "bfloat16"
    with pytest.raises(UserError, match="mixed_precision bf16"):
        resolve_base_weights_dtype("bfloat16", "no")
