"""The plan's --fp16 on a GPU: fp16 autocast with a GradScaler (accelerate's AcceleratedOptimizer).
No GPU runs here, so the same objects run on the CPU: accelerate's fp16 set-up with torch's CPU
GradScaler put where accelerate puts the CUDA one, and fp16 autocast on the CPU. train_lora.py's own
step (training.step.accumulate with accelerate's backward, then train_lora.optimizer_step) must
unscale the gradients, then clip them, then step, and skip the step (lowering the scale) when a
gradient is not finite."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lora import train_lora
from lora.config import Config
from lora.training import step as training_step
from lora.training.checkpoints import TrainState


def _fp16_accelerator(init_scale: float = 2.0 ** 12):
    """accelerate's fp16 set-up as on a GPU, on the CPU: torch's CPU GradScaler where accelerate
    puts torch's CUDA GradScaler, and its fp16 autocast."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision="fp16", cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    acc.native_amp = True
    return acc


def _run(acc, params, lr: float = 0.01, max_grad_norm: float = 0.5):
    cfg = Config()
    cfg.training.max_grad_norm = max_grad_norm
    opt = acc.prepare(torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    return SimpleNamespace(cfg=cfg, state=TrainState(), device=torch.device("cpu"), acc=acc, params=params,
                           optimizer=opt)


def test_unscale_then_clip_then_step_and_an_inf_gradient_skips_the_step():
    acc = _fp16_accelerator()
    p = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    w = torch.tensor([3.0, -4.0, 12.0, 0.5])  # gradient norm 13.01
    run = _run(acc, [p])
    ref = torch.nn.Parameter(p.detach().clone())
    ref_opt = torch.optim.AdamW([ref], lr=0.01, weight_decay=0.0)

    # a normal step: the scaled gradient is unscaled, clipped to 0.5, then AdamW steps on it
    acc.backward((w * p).sum())
    assert torch.allclose(p.grad, w * 2.0 ** 12)  # scaled by the GradScaler
    norm = train_lora.optimizer_step(run, torch.tensor(1.0))
    assert float(norm) == pytest.approx(float(w.norm()), rel=1e-6)  # the unscaled norm
    ref.grad = w * (0.5 / w.norm())
    ref_opt.step()
    torch.testing.assert_close(p.detach(), ref.detach())
    assert not run.optimizer.step_was_skipped

    # an inf gradient with a finite loss: the scaler skips the step and halves its scale
    run.optimizer.zero_grad()
    acc.backward((w * p).sum())
    p.grad[2] = float("inf")
    before = p.detach().clone()
    norm = train_lora.optimizer_step(run, torch.tensor(1.0))
    assert not torch.isfinite(norm) and run.optimizer.step_was_skipped
    assert torch.equal(p.detach(), before) and acc.scaler.get_scale() == 2.0 ** 11
    assert run.state.nan_in_a_row == 0  # (the loss was finite: the scaler's business, not a NaN step)

    # and the next step runs at the lower scale
    run.optimizer.zero_grad()
    acc.backward((w * p).sum())
    assert torch.allclose(p.grad, w * 2.0 ** 11)
    train_lora.optimizer_step(run, torch.tensor(1.0))
    ref.grad = w * (0.5 / w.norm())
    ref_opt.step()
    torch.testing.assert_close(p.detach(), ref.detach())


def test_a_nan_loss_is_skipped_before_the_scaler_sees_it():
    acc = _fp16_accelerator()
    p = torch.nn.Parameter(torch.ones(3))
    run = _run(acc, [p])
    acc.backward((p * 2).sum())
    assert train_lora.optimizer_step(run, torch.tensor(float("nan"))) is None
    assert run.state.nan_in_a_row == 1 and torch.equal(p.detach(), torch.ones(3))


def test_an_fp16_training_step_of_the_tiny_model_on_the_cpu(tiny_model_dir):
    """step_loss under accelerate's fp16 autocast (the decoder's matmuls in float16) and the scaled
    backward of training.step.accumulate, then train_lora.optimizer_step: the LoRA weights move
    the way the fp32 step moves them (AdamW's first step follows the gradient's signs)."""
    from lora import test_model
    from lora.modeling import loading
    from lora.modeling.adapter import attach_lora

    cfg = Config()
    cfg.model.model_path = str(tiny_model_dir)
    cfg.lora.lora_rank = 4
    updates = {}
    for precision in ("fp16", "no"):
        torch.manual_seed(0)
        model, processor, info = loading.load_base_model(cfg.model)
        model = attach_lora(model, cfg.lora)
        for name, prm in model.named_parameters():  # B = 0 at init: give the update a direction
            if "lora_B" in name:
                prm.data = 0.01 * torch.randn(prm.shape, generator=torch.Generator().manual_seed(1))
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        torch.manual_seed(1)
        batch = test_model.random_batch(model, processor, info, 2, 1.0, torch.device("cpu"))
        acc = _fp16_accelerator() if precision == "fp16" else None
        if acc is None:
            from accelerate import Accelerator
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()
            acc = Accelerator(mixed_precision="no", cpu=True)
        run = _run(acc, params, lr=1e-3, max_grad_norm=1.0)
        before = [q.detach().clone() for q in params]
        seen = {}

        head = model.get_submodule("base_model.model.decoder.lm_heads.0")
        hook = head.register_forward_hook(lambda m, i, o: seen.__setitem__("dtype", o.dtype))

        def loss_fn(b):
            return training_step.step_loss(model, processor, info, b, torch.device("cpu"), acc.autocast, True)

        stats = training_step.accumulate(loss_fn, [batch], acc.backward, [0])
        hook.remove()
        assert seen["dtype"] == (torch.float16 if precision == "fp16" else torch.float32)
        assert torch.isfinite(stats.loss)
        norm = train_lora.optimizer_step(run, stats.loss)
        assert norm is not None and torch.isfinite(norm) and not run.optimizer.step_was_skipped
        updates[precision] = torch.cat([(q.detach() - b).flatten() for q, b in zip(params, before)])
    a, b = updates["fp16"], updates["no"]
    assert float(a.abs().max()) > 0
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.9
