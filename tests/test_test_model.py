"""lora/test_model.py, the user's "is my model / GPU ready?" diagnostic: it passes on the tiny
model, checks the training step on the training window (with checkpointing when asked), says where
it failed, and runs train_lora.py's own preparation and step."""

from __future__ import annotations

import pytest
import torch

from lora.common.cli import script_command


@pytest.mark.slow
def test_test_model_step_equals_the_training_step(tmp_path, tiny_model_dir, example_data_dir):
    """On the same batch, test_model's check gives the loss and LoRA gradients of train_lora.py's
    first micro-batch, in the default precision (bf16 autocast + bf16 frozen weights where the CPU
    runs it fast): same model preparation (LoRA init, frozen-weight dtype, decoder dropout, CPU
    kernels), same step."""
    from lora import test_model, train_lora
    from lora.common.cli import log
    from lora.config import parse_config
    from lora.modeling.loading import load_base_model
    from lora.training import model_prep, plan

    cfg, _ = parse_config(["--model_path", str(tiny_model_dir), "--data_dir", str(example_data_dir),
                           "--output_dir", str(tmp_path / "out"), "--batch_size", "2"],
                          sections=train_lora.SECTIONS)
    handlers = list(log.handlers)
    run = train_lora.set_up(cfg)  # what train_lora.main runs before its loop
    try:
        model, processor, info = load_base_model(cfg.model)
        torch.manual_seed(0)
        tm_model, batch, tm_loss = test_model.training_step(cfg, model, processor, info,
                                                            torch.device("cpu"), 1.0, run.precision)
        tm_loss.loss.backward()
        # train_lora's loop: training mode, the first micro-batch's dropout seed, the step
        model_prep.set_train_mode(run.model, run.cache_text)
        torch.manual_seed(plan.micro_seed(cfg.training.seed, 0, 0))
        tr_loss = run.loss(batch)
        tr_loss.loss.backward()
    finally:
        run.runlog.close()
        for h in [h for h in log.handlers if h not in handlers]:
            log.removeHandler(h)
            h.close()
    assert tr_loss.loss.item() == tm_loss.loss.item()
    assert torch.equal(tr_loss.per_codebook, tm_loss.per_codebook)
    grads = {n: p.grad for n, p in run.model.named_parameters() if p.requires_grad}
    tm_grads = {n: p.grad for n, p in tm_model.named_parameters() if p.requires_grad}
    assert grads.keys() == tm_grads.keys() and len(grads) > 0
    assert all(torch.equal(grads[n], tm_grads[n]) for n in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads.values())


@pytest.mark.slow
def test_test_model_script_passes_on_tiny_model(tiny_model_dir, capsys):
    from lora import test_model

    rc = test_model.main(["--model_path", str(tiny_model_dir)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for section in ("== model", "== lora", "== training step", "== generation"):
        assert section in out
    # the next step: the training command, written for the folder the user runs from
    assert "OK — next step: " in out and f"{script_command('train_lora.py')} --model_path" in out
    assert "peak:" in out and "generated:  (1, 1, " in out
    # The step runs on the training window (training.max_duration, 30 s by default): its peak is
    # training's.
    assert "batch:      2 x 30 s (the training window, --max_duration) = 1500 frames" in out


def test_test_model_uses_the_training_window_and_checkpointing(tiny_model_dir, capsys):
    """--max_duration and --gradient_checkpointing (training's flags) shape the checked step, as in
    training."""
    from lora import test_model

    rc = test_model.main(["--model_path", str(tiny_model_dir), "--max_duration", "3",
                          "--gradient_checkpointing", "--batch_size", "3", "--skip_generation"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "batch:      3 x 3 s (the training window, --max_duration) = 150 frames" in out
    assert "gradient checkpointing on" in out and "peak:" in out and "in the training step" in out
    rc = test_model.main(["--model_path", str(tiny_model_dir), "--max_duration", "3", "--seconds", "1",
                          "--skip_generation"])
    out = capsys.readouterr().out
    assert rc == 0 and "batch:      2 x 1 s (--seconds) = 50 frames" in out and "gradient checkpointing off" in out


def test_test_model_script_reports_failure(tmp_path, capsys):
    from lora import test_model

    rc = test_model.main(["--model_path", str(tmp_path / "missing_model"), "--skip_generation"])
    out = capsys.readouterr().out
    assert rc != 0
    assert "FAILED at 'load model'" in out and "Next step:" in out and "OK —" not in out
