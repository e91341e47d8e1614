"""CUDA-only checks (skipped without a GPU; CI has none). Run on a GPU machine with
``python -m pytest -q tests/modeling/test_cuda_decoding.py`` (bench/gpu_check.sh does).

- the static-cache decoder replayed as a CUDA graph gives transformers' logits (unmerged LoRA,
  fp32);
- generation with decoding cuda_graph gives the same tokens as transformers' own cache (fp32), and
  runs in bf16.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import generation_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = ["hip hop 808 beat with trap drums", "lofi piano"]


def test_cuda_graph_decoder_equals_transformers_forward(tiny_model_dir, tiny_adapter_dir):
    from lora.generation.engine import _text_states
    from lora.modeling import adapter, loading, musicgen
    from lora.modeling.fast_decode import StaticDecoder

    cfg = generation_config(tiny_model_dir)
    model, processor, info = loading.load_base_model(cfg.model, device="cuda")
    model = adapter.load_lora(model, tiny_adapter_dir).to("cuda").eval()
    base = musicgen.get_base(model)
    hidden, mask = _text_states(model, processor, PROMPTS, 3.0, torch.float32)
    rows, K = hidden.shape[0], info.num_codebooks
    ids = torch.randint(0, info.vocab_size, (rows * K, 12),
                        generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        ref = base(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=ids).logits
        dec = StaticDecoder(base, hidden, mask, rows=rows, max_len=12, cuda_graph=True)
        got = [dec.prefill(ids[:, :5]).clone()] + [dec.step(ids[:, t], t).clone() for t in range(5, 12)]
    for t, logits in zip(range(4, 12), got):
        torch.testing.assert_close(logits, ref[:, t], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_cuda_graph_generation_gives_transformers_tokens(tiny_model_dir, tiny_adapter_dir, merge):
    from lora.generation.engine import generate
    from lora.generation.model import load_generation_model
    from lora.generation.requests import Request, SamplingSettings

    cfg = generation_config(tiny_model_dir, dtype="float32", merge=merge)
    model, processor, info, _ = load_generation_model(cfg, device="cuda", adapter_path=tiny_adapter_dir)
    s = SamplingSettings(guidance_scale=3.0, top_k=50, do_sample=True)
    reqs = [Request(prompt=p, seed=3 + i, duration=2.0, sampling=s) for i, p in enumerate(PROMPTS)]
    kw = dict(batch_size=2, max_window=1.2, extend_stride=0.8, progress=False)
    ref = generate(model, processor, info, reqs, decoding="transformers", **kw)
    got = generate(model, processor, info, reqs, decoding="cuda_graph", **kw)
    assert len(ref[0].windows) == 2
    for a, b in zip(ref, got):
        assert torch.equal(a.codes, b.codes)


def test_cuda_graph_generation_in_bf16(tiny_model_dir, tiny_adapter_dir):
    import numpy as np

    from lora.generation.engine import generate
    from lora.generation.model import load_generation_model
    from lora.generation.requests import Request, SamplingSettings

    cfg = generation_config(tiny_model_dir, dtype="bfloat16")
    model, processor, info, _ = load_generation_model(cfg, device="cuda", adapter_path=tiny_adapter_dir)
    s = SamplingSettings(guidance_scale=3.0, top_k=250, do_sample=True)
    reqs = [Request(prompt=p, seed=i, duration=3.0, sampling=s) for i, p in enumerate(PROMPTS)]
    # auto = cuda_graph on CUDA
    out = generate(model, processor, info, reqs, batch_size=2, progress=False)
    for r in out:
        assert r.codes.shape == (info.num_codebooks, info.frames(3.0))
        assert np.isfinite(r.audio).all() and np.abs(r.audio).max() > 0
