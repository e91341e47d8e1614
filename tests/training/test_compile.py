"""training.torch_compile: the compiled step (inductor, static shapes) against the eager step, on
the tiny model.

* Padding to the static shapes (frames to the bucket, text states to a fixed length, the batch to
  batch_size) leaves the loss and the LoRA gradients unchanged (eager, fp32 and the CPU's training
  precision).
* The compiled step, set up by lora.training.model_prep.prepare_model exactly as train_lora.py does
  with torch_compile on, gives the eager step's loss and LoRA gradients: relative gradient error
  ||g_c - g_e|| / ||g_e|| < 2e-2 and relative loss error < 1e-2 in bf16 (autocast + bf16 frozen
  weights), < 1e-4 in fp32. Dropout is 0 (LoRA and decoder) so both are deterministic.
* The decoder compiles as one graph, and two micro-batches of other lengths (frames, text tokens,
  clips) inside the same bucket compile nothing more.
"""

from __future__ import annotations

import pytest
import torch

from lora.config import Config
from lora.modeling.loading import load_base_model
from lora.modeling.precision import choose_precision
from lora.training.model_prep import (
    STATIC_SHAPES_ATTR,
    StaticShapes,
    autocast_for,
    prepare_model,
    set_train_mode,
    static_shapes_for,
)
from lora.training.step import accumulate, step_loss

CPU = torch.device("cpu")
# bf16: autocast + bf16 frozen weights on both sides, but different kernels (inductor's fused ones
# vs eager's).
TOL = {"bf16": {"loss": 1e-2, "grad": 2e-2}, "no": {"loss": 1e-4, "grad": 1e-4}}
PRECISIONS = sorted({choose_precision("auto", CPU)[0], "no"})


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._dynamo
    import transformers.models.musicgen.modeling_musicgen as modeling
    from torch._dynamo.utils import counters

    # compile_decoder swaps it for its LayerDrop stand-in: put it back after
    real_random = modeling.random
    torch._dynamo.reset()
    counters.clear()  # (reset() keeps the compile counters)
    yield
    torch._dynamo.reset()
    modeling.random = real_random


def _cfg(tiny_model_dir, compile_: bool) -> Config:
    cfg = Config()
    cfg.model.model_path = str(tiny_model_dir)
    cfg.lora.lora_dropout = 0.0
    cfg.training.decoder_dropout = 0.0
    cfg.training.max_duration = 10.0  # 500 frames at 50 Hz: two 250-frame buckets
    cfg.training.batch_size = 2
    cfg.training.torch_compile = compile_
    return cfg


def _model(tiny_model_dir, precision: str, compile_: bool):
    """The LoRA model as train_lora.py prepares it, with seeded, non-zero LoRA weights (peft starts
    lora_B at 0, which would leave every lora_A gradient 0)."""
    cfg = _cfg(tiny_model_dir, compile_)
    model, processor, info = load_base_model(cfg.model)
    torch.manual_seed(0)
    model, params = prepare_model(model, cfg, precision, CPU)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    set_train_mode(model, cache_text=True)
    return model, processor, info, params


def _batch(info, B: int, T: int, L: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, info.vocab_size, (B, info.num_codebooks, T), generator=g)
    lengths = torch.tensor([T - 5 * i for i in range(B)])
    hidden = torch.randn(B, L, info.text_hidden_size, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1:, L - 2:] = 0  # a shorter caption
    return {"codes": codes, "lengths": lengths, "hidden": hidden, "mask": mask,
            "dropped": torch.zeros(B, dtype=torch.bool), "texts": ["x"] * B}


def _step(model, processor, info, params, micro_batches, precision):
    """train_lora.py's step: accumulate (token-weighted) over the micro-batches -> (loss, flat LoRA
    gradient)."""
    for p in params:
        p.grad = None
    autocast = autocast_for(precision, CPU)
    stats = accumulate(lambda b: step_loss(model, processor, info, b, CPU, autocast, cache_text=True),
                       micro_batches, lambda loss: loss.backward(), seeds=[0] * len(micro_batches))
    return stats.loss.item(), torch.cat([p.grad.flatten().float() for p in params])


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_padding_to_static_shapes_keeps_loss_and_gradients(tiny_model_dir, precision):
    model, processor, info, params = _model(tiny_model_dir, precision, compile_=False)
    batch = _batch(info, B=2, T=37, L=6, seed=0)
    ref_loss, ref_grad = _step(model, processor, info, params, [batch], precision)
    plan = StaticShapes(frame_bucket=50, max_frames=500, batch_size=3, text_lengths=(16, 64))
    setattr(model, STATIC_SHAPES_ATTR, plan)  # what prepare_model sets with torch_compile on
    loss, grad = _step(model, processor, info, params, [batch], precision)
    tol = 1e-5 if precision == "no" else 1e-2
    assert abs(loss - ref_loss) <= tol * abs(ref_loss), (loss, ref_loss)
    assert _rel(grad, ref_grad) < tol, _rel(grad, ref_grad)
    # the per-clip results are the batch's own clips at their own length
    r = step_loss(model, processor, info, batch, CPU, autocast_for(precision, CPU), cache_text=True)
    assert r.ce.shape[:2] == (2, info.num_codebooks) and r.ce.shape[2] == 37 + info.num_codebooks - 1


def test_static_shapes_plan():
    cfg = Config()
    plan = StaticShapes(frame_bucket=250, max_frames=1500, batch_size=2)
    assert plan.variants == 6 * 5
    assert [plan.frames(t) for t in (1, 250, 251, 1499, 1500, 1600)] == [250, 250, 500, 1500, 1500, 1600]
    assert [plan.text(n) for n in (1, 32, 33, 512, 513)] == [32, 32, 64, 512, 1024]
    # the default: 6 frame buckets x 5 text lengths at 50 Hz
    assert cfg.training.max_duration == 30.0


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
def test_compiled_step_matches_eager_and_compiles_once_per_bucket(tiny_model_dir, precision):
    from torch._dynamo.utils import counters

    eager = _model(tiny_model_dir, precision, compile_=False)
    comp = _model(tiny_model_dir, precision, compile_=True)
    assert getattr(comp[0], STATIC_SHAPES_ATTR) == static_shapes_for(comp[0], _cfg(tiny_model_dir, True))
    first = [_batch(eager[2], B=2, T=40, L=5, seed=0)]
    # other frames (61), text tokens (9) and clips (1: a smaller last batch), same 250-frame bucket
    # and 32 tokens
    second = [_batch(eager[2], B=1, T=61, L=9, seed=1), _batch(eager[2], B=2, T=23, L=7, seed=2)]
    tol = TOL[precision]
    graphs = None
    for i, micro in enumerate((first, second)):
        e_loss, e_grad = _step(*eager, micro, precision)
        c_loss, c_grad = _step(*comp, micro, precision)
        print(f"{precision} step {i}: loss eager {e_loss:.6f} compiled {c_loss:.6f} "
              f"(rel {abs(c_loss - e_loss) / abs(e_loss):.2e}); grad rel norm {_rel(c_grad, e_grad):.2e}")
        assert abs(c_loss - e_loss) <= tol["loss"] * abs(e_loss), (c_loss, e_loss)
        assert _rel(c_grad, e_grad) < tol["grad"], _rel(c_grad, e_grad)
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
            # the decoder is compiled, as one graph (no graph break:
            # lora.modeling.musicgen.compile_decoder's LayerDrop fix)
            assert graphs == 1 and not counters["graph_break"], (dict(counters["stats"]),
                                                                 dict(counters["graph_break"]))
    # no second compile
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
