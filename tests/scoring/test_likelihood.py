"""The held-out likelihood (lora.scoring.likelihood): an adapter with LoRA in the text encoder is
scored on captions encoded on the fly, not on the base's cached text states."""

from __future__ import annotations

import pytest

from lora.scoring import likelihood


def test_text_encoder_adapter_encodes_captions_on_the_fly(tiny_model_dir, example_data_dir):
    """An adapter with LoRA in T5 (train_text_encoder) must not be scored on the base's cached text
    states."""
    import torch

    from lora.config import LoraSection, ModelConfig
    from lora.dataprep.token_cache import build_token_cache
    from lora.dataset import load_metadata
    from lora.modeling.adapter import attach_lora, text_encoder_has_lora
    from lora.modeling.loading import load_base_model

    cpu = torch.device("cpu")
    model, proc, info = load_base_model(ModelConfig(model_path=str(tiny_model_dir)))
    valid = load_metadata(example_data_dir, split="valid")
    clips, _ = build_token_cache(valid, model, proc, info, example_data_dir, show_progress=False)
    plain = likelihood.heldout_likelihood(model, clips, info, 1500, 2, cpu)
    assert not text_encoder_has_lora(model)
    torch.manual_seed(0)  # LoRA A init draws from the global generator
    peft = attach_lora(model, LoraSection(train_text_encoder=True))
    assert text_encoder_has_lora(peft)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name and "text_encoder" in name:
                p.normal_(0.0, 2.0)
    peft.eval()
    cached = likelihood.heldout_likelihood(peft, clips, info, 1500, 2, cpu)
    fly = likelihood.heldout_likelihood(peft, clips, info, 1500, 2, cpu, processor=proc)
    # decoder LoRA is still zero: cache = base
    assert cached["ce"] == pytest.approx(plain["ce"], abs=1e-6)
    # the adapted T5 changes the condition (the random tiny decoder barely listens to text: small
    # but far above the float noise of recomputing the same thing, which is 0 here)
    change = abs(fly["ce"] - cached["ce"])
    assert change > 1e-6 and change > 100 * abs(cached["ce"] - plain["ce"])
    with peft.disable_adapter():
        base_fly = likelihood.heldout_likelihood(peft, clips, info, 1500, 2, cpu, processor=proc)
    assert base_fly["ce"] == pytest.approx(plain["ce"], abs=1e-5)
