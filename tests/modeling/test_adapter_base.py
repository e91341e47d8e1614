"""Adapters whose recorded base (base_model_name_or_path) has another name than the model in use:
the plan's setup is a local model folder, while adapters from other trainers record a hub id.
When the architecture fits they load with a warning naming both; what cannot fit (another family,
another codebook count, other shapes) is refused (lora.modeling.adapter.check_adapter_fits)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lora.common.cli import UserError


def _adapter(model_dir, out_dir, recorded: str) -> Path:
    """A LoRA adapter of the tiny model (A and B random, seeded), recording ``recorded`` as its
    base."""
    from peft import LoraConfig, get_peft_model
    from transformers import MusicgenForConditionalGeneration

    model = MusicgenForConditionalGeneration.from_pretrained(str(model_dir))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    peft_model.save_pretrained(str(out_dir))
    cfg_file = Path(out_dir) / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = recorded
    cfg_file.write_text(json.dumps(cfg))
    return Path(out_dir)


def _codes(model_dir, adapter) -> torch.Tensor:
    from lora.config import Config
    from lora.generation.engine import generate
    from lora.generation.model import load_generation_model
    from lora.generation.requests import Request, SamplingSettings

    cfg = Config()
    cfg.model.model_path = str(model_dir)
    cfg.generation.dtype = "float32"
    model, processor, info, _ = load_generation_model(cfg, adapter_path=[adapter])
    req = Request(prompt="techno drums", seed=1, duration=0.5, sampling=SamplingSettings(do_sample=False))
    return generate(model, processor, info, [req], progress=False)[0].codes


@pytest.fixture(scope="module")
def local_copy(tiny_model_dir, tmp_path_factory):
    """The plan's setup: the model in a local folder of its own name."""
    folder = tmp_path_factory.mktemp("models") / "my-musicgen"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def test_an_adapter_recording_a_hub_id_loads_on_a_local_folder_with_a_warning(tiny_model_dir, local_copy,
                                                                               tmp_path, caplog):
    """base_model_name_or_path facebook/musicgen-small (not on this machine) on a local folder named
    my-musicgen: its layers fit, so it loads, the warning names both, and it generates what the
    same adapter recording the folder itself generates."""
    hub = _adapter(tiny_model_dir, tmp_path / "hub", "facebook/musicgen-small")
    own = _adapter(tiny_model_dir, tmp_path / "own", str(local_copy))
    with caplog.at_level("WARNING", logger="lora"):
        got = _codes(local_copy, hub)
    warning = next(r.getMessage() for r in caplog.records if "was trained on base model" in r.getMessage())
    assert "facebook/musicgen-small" in warning and str(local_copy) in warning
    assert "not on this machine" in warning
    assert torch.equal(got, _codes(local_copy, own))


def test_a_recorded_folder_of_another_name_with_the_same_config_loads(tiny_model_dir, local_copy, tmp_path,
                                                                       caplog):
    other = _adapter(tiny_model_dir, tmp_path / "other", str(tiny_model_dir))  # a folder on disk
    with caplog.at_level("WARNING", logger="lora"):
        _codes(local_copy, other)
    assert any("the same architecture (both config.json)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("recorded, says", [("facebook/musicgen-melody", "a mono melody model"),
                                            ("facebook/musicgen-stereo-small", "a stereo model")])
def test_a_hub_id_of_another_family_or_codebook_count_is_refused(tiny_model_dir, local_copy, tmp_path,
                                                                 recorded, says):
    """What the recorded name says contradicts the model in use (its config.json is not here to
    compare): a melody adapter on a text-only MusicGen, a stereo adapter on a mono one."""
    bad = _adapter(tiny_model_dir, tmp_path / "bad", recorded)
    with pytest.raises(UserError) as e:
        _codes(local_copy, bad)
    msg = str(e.value)
    assert recorded in msg and str(local_copy) in msg and says in msg and "a mono model" in msg
    assert f"Use --model_path {recorded}" in msg
