"""The CPU speed options of the training step (lora.modeling.cpu_speed, as the training step
configures them): bf16 storage of the frozen base weights, FastDropout, the decoder dropout setting,
the attention kernels, memory kept for reuse, and FLOP counting."""

from __future__ import annotations

import sys

import pytest
import torch

from lora.config import Config
from lora.modeling.adapter import attach_lora
from lora.modeling.cpu_speed import fast_dropout_class, use_fast_dropout
from lora.modeling.loading import load_base_model
from lora.modeling.musicgen import get_base
from tests.helpers import ROOT


def batch_loss(*args, **kwargs):
    """lora.training.step.step_loss as (loss, per-codebook loss, tokens per codebook)."""
    from lora.training.step import step_loss

    r = step_loss(*args, **kwargs)
    return r.loss, r.per_codebook, r.tokens


def test_fast_dropout_statistics_scale_grad_and_seed():
    d = fast_dropout_class()(0.1).train()
    x = torch.ones(400, 1000, requires_grad=True)
    torch.manual_seed(3)
    y = d(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.005
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() / 0.9)  # gradient flows through kept elements only
    torch.manual_seed(3)
    assert torch.equal(d(x.detach()), y.detach())  # reproducible from the torch seed
    assert not torch.equal(d(x.detach()), y.detach())  # fresh mask next call
    d.eval()
    assert d(x) is x
    assert fast_dropout_class()(0.0).train()(x) is x


def test_fast_dropout_scales_like_torch_dropout_in_bf16_and_masks_independently():
    d = fast_dropout_class()(0.1).train()
    x = torch.ones(200_000, dtype=torch.bfloat16)
    y, ref = d(x), torch.nn.functional.dropout(x, 0.1, training=True)
    assert y.dtype == torch.bfloat16
    # the kept value is torch's own CPU dropout's on a bf16 input (1/(1-p) rounded to bf16)
    assert set(y.unique().tolist()) == set(ref.unique().tolist()) == {0.0, ref.max().item()}
    # two modules, two masks: independent
    a, b = d(x) == 0, fast_dropout_class()(0.1).train()(x) == 0
    assert abs(a.float().mean().item() - 0.1) < 0.005 and abs(b.float().mean().item() - 0.1) < 0.005
    assert abs((a & b).float().mean().item() - 0.01) < 0.002
    # no structure along the 4 lanes of one 64-bit draw: each lane drops p of its elements
    lanes = a[: (a.numel() // 4) * 4].view(-1, 4).float().mean(0)
    assert torch.all((lanes - 0.1).abs() < 0.01), lanes


@pytest.fixture(scope="module")
def tiny_lora(tiny_model_dir):
    cfg = Config()
    cfg.model.model_path = str(tiny_model_dir)
    model, processor, info = load_base_model(cfg.model)
    torch.manual_seed(0)
    return attach_lora(model, cfg.lora), processor, info, cfg


def _batch(info, B=2, T=40):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, info.vocab_size, (B, info.num_codebooks, T), generator=g)
    lengths = torch.tensor([T, T - 7])
    hidden = torch.randn(B, 5, info.text_hidden_size, generator=g)
    mask = torch.ones(B, 5, dtype=torch.long)
    return {"codes": codes, "lengths": lengths, "hidden": hidden, "mask": mask,
            "dropped": torch.zeros(B, dtype=torch.bool), "texts": ["a", "b"]}


def test_bf16_base_weights_keep_lora_fp32_and_match_fp32_loss(tiny_lora, tmp_path):
    import copy
    from contextlib import nullcontext

    from safetensors.torch import load_file

    from lora.training.model_prep import prepare_frozen_weights

    model, processor, info, cfg = tiny_lora
    model = copy.deepcopy(model)
    model.eval()
    batch = _batch(info)
    with torch.no_grad():
        ref, _, _ = batch_loss(model, processor, info, batch, "cpu", nullcontext, cache_text=True)
    assert prepare_frozen_weights(model, "bf16", "auto") == "bfloat16"
    base = get_base(model)
    frozen = [p for p in base.decoder.parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with torch.no_grad():
        got, _, _ = batch_loss(model, processor, info, batch, "cpu", bf16, cache_text=True)
    assert abs(got.item() - ref.item()) < 0.02 * ref.item()
    # A training step: gradients and AdamW state are fp32, the saved adapter is fp32.
    model.train()
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    loss, _, _ = batch_loss(model, processor, info, batch, "cpu", bf16, cache_text=True)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    opt.step()
    assert all(v.dtype == torch.float32 for s in opt.state.values() for k, v in s.items() if k != "step")
    model.save_pretrained(str(tmp_path / "adapter"))
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())


def test_fast_dropout_replaces_lora_dropout(tiny_lora):
    import copy

    import torch.nn as nn

    model = copy.deepcopy(tiny_lora[0])
    before = sum(1 for m in model.modules() if type(m) is nn.Dropout and m.p > 0)
    n = use_fast_dropout(model)
    assert n > 0 and n <= before
    assert sum(1 for m in model.modules() if isinstance(m, fast_dropout_class())) == n


def test_train_flops_match_torch_flop_counter(tiny_lora):
    """The analytic FLOP count of bench_train (what '% of peak' divides by) agrees with torch's
    FlopCounterMode on a real forward+backward of the LoRA model (fp32, eager attention counted by
    the counter as matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "bench"))
    from contextlib import nullcontext

    from bench_train import count_lora, train_flops

    cfg = Config()
    cfg.model.model_path, cfg.model.attn_implementation = tiny_lora[3].model.model_path, "eager"
    # eager: the counter sees attention as matmuls
    model, processor, info = load_base_model(cfg.model)
    model = attach_lora(model, cfg.lora)
    model.train()
    B, T = 2, 60
    batch = _batch(info, B, T)
    batch["lengths"] = torch.tensor([T, T])
    with FlopCounterMode(display=False) as fc:
        loss, _, _ = batch_loss(model, processor, info, batch, "cpu", nullcontext, cache_text=True)
        loss.backward()
    base = get_base(model)
    rank, n_self, n_cross = count_lora(model)
    fl = train_flops(base.config.decoder, base.config.text_encoder, B, T, 5, rank, n_self, n_cross)
    ratio = fl["total"] / fc.get_total_flops()
    assert 0.85 < ratio < 1.15, ratio


# ------------------------------------------------------------------------------------------
# training.decoder_dropout
# ------------------------------------------------------------------------------------------
def _dec_logits(model, info, batch):
    from lora.modeling.musicgen import build_delay_pattern

    dec_in, _ = build_delay_pattern(batch["codes"], batch["lengths"], info)
    return model(encoder_outputs=(batch["hidden"],), attention_mask=batch["mask"],
                 decoder_input_ids=dec_in).logits


def test_decoder_dropout_setting_controls_train_mode_randomness(tiny_model_dir):
    from lora.training.model_prep import configure_step

    cfg = Config()
    cfg.model.model_path = str(tiny_model_dir)
    cfg.lora.lora_dropout = 0.0  # isolate the decoder's own dropout
    model, _, info = load_base_model(cfg.model)
    model = attach_lora(model, cfg.lora)
    dec = get_base(model).decoder.model.decoder
    # the checkpoint's value
    assert dec.dropout == 0.1 and {layer.dropout for layer in dec.layers} == {0.1}
    batch = _batch(info)
    model.eval()
    with torch.no_grad():
        eval_before = _dec_logits(model, info, batch)

    # null: the checkpoint's 0.1 stays
    configure_step(model, torch.device("cpu"), decoder_dropout=None)
    assert dec.dropout == 0.1 and {layer.dropout for layer in dec.layers} == {0.1}
    model.train()
    with torch.no_grad():
        a, b = _dec_logits(model, info, batch), _dec_logits(model, info, batch)
    assert not torch.equal(a, b)

    configure_step(model, torch.device("cpu"), decoder_dropout=0.0)  # the default
    assert dec.dropout == 0.0 and {layer.dropout for layer in dec.layers} == {0.0}
    # attention / activation dropout are left as the config has them
    assert {layer.activation_dropout
            for layer in dec.layers} == {get_base(model).config.decoder.activation_dropout}
    assert {layer.self_attn.dropout
            for layer in dec.layers} == {get_base(model).config.decoder.attention_dropout}
    # the model config (and so any saved file) is unchanged
    assert get_base(model).config.decoder.dropout == 0.1
    model.train()
    with torch.no_grad():
        a, b = _dec_logits(model, info, batch), _dec_logits(model, info, batch)
    assert torch.equal(a, b)  # no random op left in the train-mode forward
    model.eval()
    with torch.no_grad():
        assert torch.equal(_dec_logits(model, info, batch), eval_before)  # evaluation is unaffected


def test_decoder_dropout_in_resolved_config_and_checked(tmp_path):
    import yaml

    from lora.common.fields import ConfigError
    from lora.config import parse_config
    from lora.train_lora import SECTIONS, check_config

    cfg, _ = parse_config([], sections=SECTIONS)
    assert cfg.training.decoder_dropout == 0.0
    cfg, _ = parse_config(["--decoder_dropout", "null"], sections=SECTIONS)
    assert cfg.training.decoder_dropout is None
    cfg, _ = parse_config(["--decoder_dropout", "0.05"], sections=SECTIONS)
    cfg.save(tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["training"]["decoder_dropout"] == 0.05
    # the schema's range, before any script runs
    with pytest.raises(ConfigError, match="decoder_dropout"):
        parse_config(["--decoder_dropout", "1.5"], sections=SECTIONS)
    check_config(parse_config(["--decoder_dropout", "0.5"], sections=SECTIONS)[0])


def test_codebook_losses_match_per_codebook_cross_entropy_values_and_gradients(tiny_lora):
    """codebook_losses computes one cross-entropy over all codebooks; it must equal K separate
    per-codebook cross-entropies (what transformers' MusicGen loss does), for the loss, the
    per-codebook losses, the token counts and the gradient, with batch padding and delay-pattern
    -100s in the labels."""
    import torch.nn.functional as F

    from lora.modeling.musicgen import build_delay_pattern, codebook_loss

    def codebook_losses(logits, labels):
        r = codebook_loss(logits, labels)
        return r.loss, r.per_codebook, r.tokens

    _, _, info, _ = tiny_lora
    b, k, t, v = 3, info.num_codebooks, 30, info.vocab_size
    g = torch.Generator().manual_seed(1)
    _, labels = build_delay_pattern(torch.randint(0, v, (b, k, t), generator=g),
                                    torch.tensor([t, 21, 9]), info)
    s = labels.shape[1]
    # logits exactly as long as the labels (training), or longer (only the last s count)
    for extra in (0, 3):
        logits = torch.randn(b * k, s + extra, v, generator=g, requires_grad=True)
        loss, per, n = codebook_losses(logits, labels)
        loss.backward()
        got_grad, logits.grad = logits.grad, None
        lg = logits.reshape(b, k, -1, v)[:, :, -s:]
        ref_per, ref_n = [], []
        for c in range(k):
            lab = labels[..., c].reshape(-1)
            ref_n.append((lab != -100).sum())
            ref_per.append(F.cross_entropy(lg[:, c].reshape(-1, v), lab, ignore_index=-100,
                                           reduction="sum")
                           / ref_n[-1].clamp(min=1))
        ref = torch.stack(ref_per).mean()
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(per, torch.stack(ref_per).detach(), rtol=1e-6, atol=1e-6)
        assert torch.equal(n, torch.stack(ref_n)) and n.dtype == torch.long
        torch.testing.assert_close(got_grad, logits.grad, rtol=1e-5, atol=1e-8)
        logits.grad = None


# ------------------------------------------------------------------------------------------
# Attention kernels in the training step
# ------------------------------------------------------------------------------------------
def _flash_calls(fn) -> int:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages()
               if e.key == "aten::_scaled_dot_product_flash_attention_for_cpu")


def test_cpu_train_attention_picks_the_kernel_by_frames_times_text_tokens(tiny_model_dir):
    """While training on CPU, the cross-attention runs the math kernel only up to
    MATH_CROSS_ATTENTION_MAX_SCORES audio frames x text tokens: a batch with caption states long
    enough to pass it gets flash for every layer's cross-attention as well as its self-attention; a
    short one only for the self-attention."""
    import copy
    from contextlib import nullcontext

    from lora.modeling.cpu_speed import MATH_CROSS_ATTENTION_MAX_SCORES, math_cross_attention
    from lora.training.model_prep import configure_step

    # 10-s clips / 30-s windows
    assert math_cross_attention(503, 96) and not math_cross_attention(1503, 64)
    cfg = Config()
    cfg.model.model_path = str(tiny_model_dir)
    model, processor, info = load_base_model(cfg.model)
    torch.manual_seed(0)
    model = attach_lora(model, cfg.lora)
    configure_step(model, torch.device("cpu"))
    model.train()
    n_layers = get_base(model).config.decoder.num_hidden_layers
    T = 40
    S = T + info.num_codebooks - 1  # decoder positions: the frames plus the delay pattern's
    for keys, flash in ((MATH_CROSS_ATTENTION_MAX_SCORES // S, n_layers),
                        (MATH_CROSS_ATTENTION_MAX_SCORES // S + 1, 2 * n_layers)):
        batch = _batch(info, T=T)
        batch["lengths"][:] = T
        g = torch.Generator().manual_seed(1)
        batch["hidden"] = torch.randn(2, keys, info.text_hidden_size, generator=g)
        batch["mask"] = torch.ones(2, keys, dtype=torch.long)
        m = copy.deepcopy(model)

        def step():
            batch_loss(m, processor, info, batch, torch.device("cpu"), nullcontext,
                       cache_text=True)[0].backward()

        assert _flash_calls(step) == flash, f"{keys} text tokens x {S} positions"


def test_self_attention_runs_causal_sdpa_without_a_mask(tiny_lora, monkeypatch):
    """The training forward gives SDPA no materialized mask for the decoder's self-attention
    (is_causal fast path), also with batch padding (padded frames are at the end and masked out of
    the loss instead)."""
    from contextlib import nullcontext

    import transformers.integrations.sdpa_attention as sa

    model, processor, info, _ = tiny_lora
    calls = []
    real = sa.torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((q.shape[2], k.shape[2], attn_mask is None, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(sa.torch.nn.functional, "scaled_dot_product_attention", spy)
    batch = _batch(info)  # lengths differ: batch padding
    batch["mask"][1, 3:] = 0  # text padding
    model.train()
    batch_loss(model, processor, info, batch, torch.device("cpu"), nullcontext, cache_text=True)
    n_layers = get_base(model).config.decoder.num_hidden_layers
    self_calls = [c for c in calls if c[0] == c[1]]
    cross_calls = [c for c in calls if c[0] != c[1]]
    assert len(self_calls) == len(cross_calls) == n_layers
    assert all(no_mask and causal for _, _, no_mask, causal in self_calls)
    # the text padding mask
    assert all(not no_mask and not causal for _, _, no_mask, causal in cross_calls)


@pytest.mark.slow
def test_cpu_train_attention_uses_math_kernel_for_cross_attention_with_the_same_loss_and_grads(tiny_model_dir):
    """configure_step on CPU switches the decoder to CPU_TRAIN_ATTENTION: while training, the
    cross-attention runs SDPA's math kernel instead of the flash kernel (self-attention keeps
    flash); loss and LoRA gradients match plain sdpa with text padding and a null-condition (fully
    masked) sample, in fp32 and bf16."""
    import copy

    from lora.modeling.cpu_speed import CPU_TRAIN_ATTENTION
    from lora.modeling.musicgen import set_decoder_dropout
    from lora.training.model_prep import configure_step, prepare_frozen_weights

    cfg = Config()
    cfg.model.model_path = str(tiny_model_dir)
    cfg.lora.lora_dropout = 0.0
    model, processor, info = load_base_model(cfg.model)
    torch.manual_seed(0)
    ref = attach_lora(model, cfg.lora)
    for p in ref.parameters():  # non-zero LoRA B so the LoRA gradients depend on the attention
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    batch = _batch(info)
    batch["mask"][0, 3:] = 0  # text padding
    batch["mask"][1] = 0  # the null condition: no visible text token
    batch["hidden"][1] = 0
    for precision in ("no", "bf16"):
        a, b = copy.deepcopy(ref), copy.deepcopy(ref)
        ac = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else \
            (lambda: torch.autocast("cpu", enabled=False))
        for m in (a, b):
            prepare_frozen_weights(m, precision, "auto")
        # what configure_step does to b besides the attention (no LoRA dropout here)
        set_decoder_dropout(a, 0.0)
        configure_step(b, torch.device("cpu"))
        assert get_base(a).config.decoder._attn_implementation == "sdpa"
        assert get_base(b).config.decoder._attn_implementation == CPU_TRAIN_ATTENTION
        out = {}
        for name, m in (("sdpa", a), ("cpu_train", b)):
            m.train()
            res = {}

            def step():
                res["loss"] = batch_loss(m, processor, info, batch, torch.device("cpu"), ac,
                                         cache_text=True)[0]
                res["loss"].backward()

            res["flash"] = _flash_calls(step)
            res["grads"] = [p.grad.clone() for p in m.parameters() if p.requires_grad]
            out[name] = res
        n_layers = get_base(a).config.decoder.num_hidden_layers
        assert out["sdpa"]["flash"] == 2 * n_layers and out["cpu_train"]["flash"] == n_layers
        tol = {"no": 1e-5, "bf16": 2e-2}[precision]
        torch.testing.assert_close(out["cpu_train"]["loss"], out["sdpa"]["loss"], rtol=tol, atol=tol)
        for ga, gb in zip(out["sdpa"]["grads"], out["cpu_train"]["grads"]):
            assert torch.isfinite(gb).all()
            torch.testing.assert_close(gb, ga, rtol=tol * 10, atol=tol * ga.abs().max().item())
        with torch.no_grad():  # evaluation keeps the flash kernel
            b.eval()
            assert _flash_calls(lambda: batch_loss(b, processor, info, batch, torch.device("cpu"), ac,
                                                   cache_text=True)) == 2 * n_layers


_REUSE_PROBE = r"""
import resource, sys
import torch
sys.path.insert(0, sys.argv[1])
from lora.modeling.cpu_speed import keep_freed_memory
kept = keep_freed_memory() if sys.argv[2] == "keep" else None
x, w = torch.randn(2, 1, 320000), torch.randn(32, 1, 7)  # 2 x 10 s of 32-kHz audio into a first codec layer
faults = []
for _ in range(8):  # the same layer again: two 82-MB activations, freed after each pass
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.nn.functional.elu(torch.nn.functional.conv1d(x, w, padding=3))
    del y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux)")
def test_keep_freed_memory_reuses_big_tensors_without_page_faults():
    """train_lora.py on a CPU: the activations of a layer run again reuse the pages freed by its
    last pass (glibc keeps them), where by default each one over 32 MiB is a fresh mmap whose pages
    the kernel faults in again."""
    import platform
    import subprocess

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")

    def probe(mode):
        out = subprocess.run([sys.executable, "-c", _REUSE_PROBE, str(ROOT), mode],
                             capture_output=True, text=True, check=True).stdout.split()
        return out[0], [int(x) for x in out[1:]]

    kept, faults = probe("keep")
    assert kept == "True"
    _, default = probe("default")
    # by default 82 MB = 20,000 pages faulted in again on every pass
    assert min(default[1:]) > 20000, default
    # From the second pass on, freed pages are reused (an occasional pass still grows the heap:
    # glibc's placement).
    assert sum(faults[1:]) < sum(default[1:]) / 4, (faults, default)
