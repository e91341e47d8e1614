"""Noise a user learns to ignore, and then misses the warning that matters: loading a hub MusicGen
and attaching LoRA say nothing about MusicGen's own conventions or transformers' deprecations; a
real problem still warns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.helpers import ROOT


def _hub_like(src: Path, dst: Path, decoder_pad: int | None = None) -> Path:
    """The tiny model with its special token ids also at the top level of config.json, as the hub's
    facebook/musicgen-* configs have them (pad = bos = decoder_start = vocab_size there);
    ``decoder_pad``: a pad id of the decoder's that breaks the convention."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key in ("pad_token_id", "bos_token_id", "decoder_start_token_id"):
        cfg[key] = cfg["decoder"][key]
    if decoder_pad is not None:
        cfg["decoder"]["pad_token_id"] = decoder_pad
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _load_in_a_fresh_process(folder: Path) -> str:
    """stderr of loading a model as a script does (a new process: transformers' logging as a user
    gets it, not as pytest sets it up)."""
    code = ("from lora.common.cli import setup_logging; setup_logging(); "
            "from lora.config import ModelConfig; from lora.modeling.loading import load_base_model; "
            f"load_base_model(ModelConfig(model_path={str(folder)!r}))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stderr


@pytest.mark.slow  # (over ~2 s: the full suite runs it, the fast loop leaves it out)
def test_musicgen_special_token_convention_is_not_warned(tmp_path, tiny_model_dir):
    """transformers warns 'pad_token_id must be None or within the vocabulary (... got 2048)' three
    times per load of a hub MusicGen: MusicGen's pad/BOS id is vocab_size by design."""
    err = _load_in_a_fresh_process(_hub_like(tiny_model_dir, tmp_path / "hub_like"))
    assert "Loaded " in err
    assert "within the vocabulary" not in err, err


@pytest.mark.slow  # (over ~2 s: the full suite runs it, the fast loop leaves it out)
def test_a_special_token_outside_the_convention_still_warns(tmp_path, tiny_model_dir):
    err = _load_in_a_fresh_process(_hub_like(tiny_model_dir, tmp_path / "broken", decoder_pad=999))
    assert "got 999" in err


@pytest.fixture
def tiny_base(tiny_model_dir):
    from lora.config import ModelConfig
    from lora.modeling.loading import load_base_model

    return load_base_model(ModelConfig(model_path=str(tiny_model_dir)))[0]


def test_attaching_and_loading_lora_gives_no_deprecation_warning(tiny_base, tmp_path):
    """peft asks `is_gradient_checkpointing`, deprecated in transformers 5: a FutureWarning at every
    LoRA attach on today's main."""
    from lora.config import LoraSection
    from lora.modeling.adapter import attach_lora, load_lora

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = attach_lora(tiny_base, LoraSection())
        model.save_pretrained(str(tmp_path / "adapter"))
        base = model.unload()
        load_lora(base, tmp_path / "adapter")
    messages = [str(w.message) for w in seen]
    assert not [m for m in messages if "is_gradient_checkpointing" in m], messages
