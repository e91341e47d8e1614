"""export_model.py --dtype bfloat16 halves the decoder, and keeps EnCodec and the text encoder in
float32: a token cache built on the export (a new adapter trained on top of the fine-tune) gets the
base model's codes and caption states exactly; --cast_encoders stores them in bfloat16 too."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _codes_and_states(folder):
    from lora.config import ModelConfig
    from lora.modeling import musicgen
    from lora.modeling.loading import load_base_model

    model, processor, info = load_base_model(ModelConfig(model_path=str(folder)))
    t = np.arange(32000 * 2) / 32000
    wav = torch.tensor(0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 1.3 * t), dtype=torch.float32)
    wav = wav + 0.05 * torch.randn(wav.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        codes = musicgen.encode_audio(model, wav[None, None], info)[0]
        hidden, _ = musicgen.encode_text(model, processor, ["techno drums 128 BPM"])
    return model, codes, hidden


@pytest.mark.slow
def test_a_half_precision_export_keeps_the_codec_and_text_encoder_exact(tiny_model_dir, trained_output_dir,
                                                                        tmp_path):
    from safetensors import safe_open

    from lora import export_model

    _, base_codes, base_states = _codes_and_states(tiny_model_dir)
    out = {}
    for name, extra in (("half", []), ("all_half", ["--cast_encoders", "true"])):
        out[name] = tmp_path / name
        assert export_model.main(["--base_model_path", str(tiny_model_dir), "--lora_model_path",
                                  str(trained_output_dir / "best_model"), "--dtype", "bfloat16",
                                  "--output_dir", str(out[name]), *extra]) == 0
    with safe_open(str(out["half"] / "model.safetensors"), framework="pt") as fh:
        dtypes = {k: fh.get_slice(k).get_dtype() for k in fh.keys()}
    assert {d for k, d in dtypes.items() if k.startswith("decoder.")} == {"BF16"}
    assert {d for k, d in dtypes.items() if k.startswith(("audio_encoder.", "text_encoder."))} == {"F32"}
    _, codes, states = _codes_and_states(out["half"])
    assert torch.equal(codes, base_codes) and torch.equal(states, base_states)
    _, codes, states = _codes_and_states(out["all_half"])
    changed = (codes != base_codes).float().mean(dim=-1)  # share of codes changed, per codebook
    assert float(changed.max()) > 0.05 and not torch.equal(states, base_states)
