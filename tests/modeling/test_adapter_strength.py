"""Adapter strength (lora_scale) for layers an adapter saved whole (peft's modules_to_save, e.g. a
retrained LM head from another trainer): the saved weights follow the same straight line as a LoRA
update, W_base + s (W_saved - W_base), so scale 0 is the base model exactly and 0.5 is halfway
(lora.modeling.adapter.scale_saved_module)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

HEAD = "decoder.lm_heads.0"


def _adapter(model_dir, out_dir, seed: int, **config) -> Path:
    """An adapter made as another peft-based trainer would: LoRA on q/v plus the first LM head saved
    whole, every trainable weight moved by random noise."""
    from peft import LoraConfig, get_peft_model
    from transformers import MusicgenForConditionalGeneration

    model = MusicgenForConditionalGeneration.from_pretrained(str(model_dir))
    cfg = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_heads.0"])
    cfg.update(config)
    peft_model = get_peft_model(model, LoraConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    for _, p in peft_model.named_parameters():
        if p.requires_grad:
            p.data = p.data + torch.randn(p.shape, generator=g) * 0.3
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


@pytest.fixture(scope="module")
def saved_head(tiny_model_dir, tmp_path_factory):
    return _adapter(tiny_model_dir, tmp_path_factory.mktemp("adapters") / "head", seed=1)


def _base(model_dir):
    from lora.config import ModelConfig
    from lora.modeling.loading import load_base_model

    model, processor, info = load_base_model(ModelConfig(model_path=str(model_dir)))
    return model.eval(), processor, info


def _logits(model, processor, info) -> torch.Tensor:
    from lora.modeling import musicgen

    hidden, mask = musicgen.encode_text(model, processor, ["techno drums", "piano"])
    codes = torch.randint(0, info.vocab_size, (2, info.num_codebooks, 12),
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = musicgen.teacher_forced_logits(model, info, codes, torch.tensor([12, 9]), hidden, mask)
    return logits


def _saved_weights(adapter_dir) -> torch.Tensor:
    from safetensors.torch import load_file

    w = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    return next(v for k, v in w.items() if "lm_heads.0" in k and k.endswith("weight"))


def test_scale_0_is_the_base_model_and_1_is_the_adapter_as_peft_loads_it(tiny_model_dir, saved_head):
    from peft import PeftModel

    from lora.modeling.adapter import load_adapters

    model, processor, info = _base(tiny_model_dir)
    base = _logits(model, processor, info)
    zero, _ = load_adapters(_base(tiny_model_dir)[0], [saved_head], [0.0])
    assert torch.equal(_logits(zero, processor, info), base)
    one, _ = load_adapters(_base(tiny_model_dir)[0], [saved_head], [1.0])
    ref = PeftModel.from_pretrained(_base(tiny_model_dir)[0], str(saved_head)).eval()
    assert torch.equal(_logits(one, processor, info), _logits(ref, processor, info))
    assert (_logits(one, processor, info) - base).abs().max() > 1e-2  # the adapter matters


def test_half_strength_is_halfway_for_the_saved_layer_and_the_lora_update(tiny_model_dir, saved_head):
    """0.5: the LoRA update at half (peft's set_scale) and the saved head at the midpoint of the base
    head and the saved one; merged equals unmerged; strengths can be changed back and forth."""
    from peft import PeftModel

    from lora.modeling.adapter import load_adapters, merge_lora, set_lora_scale

    model, processor, info = _base(tiny_model_dir)
    w_base = dict(model.named_parameters())[f"{HEAD}.weight"].detach().clone()
    half, _ = load_adapters(model, [saved_head], [0.5])
    got = _logits(half, processor, info)
    ref = PeftModel.from_pretrained(_base(tiny_model_dir)[0], str(saved_head)).eval()
    for m in ref.modules():
        if hasattr(m, "set_scale") and hasattr(m, "lora_A"):
            m.set_scale("default", 0.5)
    head = ref.get_submodule(f"base_model.model.{HEAD}").modules_to_save["default"]
    with torch.no_grad():
        head.weight.copy_((w_base + _saved_weights(saved_head)) / 2)
    torch.testing.assert_close(got, _logits(ref, processor, info), atol=1e-5, rtol=1e-5)
    for s in (1.0, 0.0, 0.5):  # back and forth: the saved weights are kept
        set_lora_scale(half, s)
    torch.testing.assert_close(_logits(half, processor, info), got, atol=1e-6, rtol=1e-6)
    merged = merge_lora(half)
    torch.testing.assert_close(_logits(merged, processor, info), got, atol=1e-5, rtol=1e-5)


def test_a_mix_gives_the_saved_layer_its_own_adapter_s_strength(tiny_model_dir, saved_head, tmp_path):
    """Mixing [adapter with a saved head at 0.5, plain LoRA at 1]: the head is halfway; with the
    first adapter at 0 the head is the base's."""
    from lora.modeling.adapter import load_adapters, set_adapter_scales

    plain = _adapter(tiny_model_dir, tmp_path / "plain", seed=2, modules_to_save=None,
                     target_modules=["fc1"])
    model, processor, info = _base(tiny_model_dir)
    w_base = dict(model.named_parameters())[f"{HEAD}.weight"].detach().clone()
    mixed, ids = load_adapters(model, [saved_head, plain], [0.5, 1.0])
    wrapper = mixed.get_submodule(f"base_model.model.{HEAD}")
    assert wrapper.active_adapters == ["default"]
    torch.testing.assert_close(wrapper.modules_to_save["default"].weight,
                               (w_base + _saved_weights(saved_head)) / 2)
    set_adapter_scales(mixed, {ids[0]["adapter_name"]: 0.0, ids[1]["adapter_name"]: 1.0})
    x = torch.randn(3, w_base.shape[1])
    torch.testing.assert_close(wrapper(x), x @ w_base.T)
    set_adapter_scales(mixed, {ids[0]["adapter_name"]: 1.0, ids[1]["adapter_name"]: 1.0})
    torch.testing.assert_close(wrapper(x), x @ _saved_weights(saved_head).T)
    assert json.loads((saved_head / "adapter_config.json").read_text())["modules_to_save"]
