"""Training numbers a user can trust: the step's objective weighs tokens (not micro-batches),
checkpoints are durable before older ones are rotated out, and TensorBoard shows each step once
after a resume."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch


def _train_args(tiny_model_dir, data_dir, out, *extra):
    own = {"--max_steps": "4", "--gradient_accumulation_steps": "1", "--eval_steps": "100",
           "--save_steps": "2",
           "--logging_steps": "1", "--mixed_precision": "no", "--max_duration": "1"}
    args = ["--model_path", str(tiny_model_dir), "--data_dir", str(data_dir), "--output_dir", str(out)]
    for flag, value in own.items():
        if flag not in extra:
            args += [flag, value]
    return args + [str(a) for a in extra]


# ------------------------------------------------------------------------------------------
# Token weighting under gradient accumulation
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_step(tiny_model_dir):
    from lora.config import LoraSection, ModelConfig
    from lora.dataset import CachedClip, CachedTokenDataset, collate_tokens
    from lora.modeling.adapter import attach_lora
    from lora.modeling.loading import load_base_model
    from lora.training.step import step_loss

    model, processor, info = load_base_model(ModelConfig(model_path=str(tiny_model_dir)))
    torch.manual_seed(0)
    model = attach_lora(model, LoraSection(lora_dropout=0.0))
    for _n, p in model.named_parameters():  # non-zero B: every LoRA matrix gets a gradient
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    model.eval()  # no dropout: the comparison is exact up to float rounding
    g = torch.Generator().manual_seed(1)
    lengths = [12, 20, 70, 90]  # short and long clips, as length bucketing over 5-30 s clips gives
    clips = [CachedClip(id=str(i), text="x", split="train",
                        codes=torch.randint(0, info.vocab_size, (info.num_codebooks, n),
                                            generator=g).short(),
                        hidden=torch.randn(4, info.text_hidden_size, generator=g),
                        mask=torch.ones(4, dtype=torch.long))
             for i, n in enumerate(lengths)]
    ds = CachedTokenDataset(clips, 100, train=False)

    def batch(idx):
        return collate_tokens([ds[i] for i in idx], info.pad_token_id)

    def loss_fn(b):
        return step_loss(model, processor, info, b, torch.device("cpu"), nullcontext, cache_text=True)

    return model, batch, loss_fn


def _grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


def test_one_batch_of_four_equals_two_accumulated_batches_of_two_on_unequal_lengths(lora_step):
    from lora.training.step import accumulate

    model, batch, loss_fn = lora_step
    one = accumulate(loss_fn, [batch([0, 1, 2, 3])], lambda loss: loss.backward(), seeds=[0])
    g_one = _grads(model)
    two = accumulate(loss_fn, [batch([0, 1]), batch([2, 3])], lambda loss: loss.backward(), seeds=[0, 1])
    g_two = _grads(model)
    assert one.samples == two.samples == 4
    torch.testing.assert_close(two.loss, one.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two.per_codebook, one.per_codebook, rtol=1e-5, atol=1e-6)
    for n in g_one:
        torch.testing.assert_close(g_two[n], g_one[n], rtol=1e-4, atol=1e-7)
    # The old rule (each micro-batch's mean counts equally) weighs the short clips' tokens ~4x more
    # here.
    a, b = loss_fn(batch([0, 1])).loss, loss_fn(batch([2, 3])).loss
    ((a + b) / 2).backward()
    g_old = _grads(model)
    assert abs(float((a + b) / 2) - float(one.loss)) > 1e-3
    assert any(not torch.allclose(g_old[n], g_one[n], rtol=1e-3, atol=1e-6) for n in g_one)


def test_equal_micro_batches_weigh_exactly_one_over_the_accumulation(lora_step):
    """With equal lengths the token weight is 1/accumulation, bit for bit (so runs on equal-length
    clips, like the example set, train exactly as before the change)."""
    from lora.training.step import accumulate

    model, batch, loss_fn = lora_step
    seen = []
    accumulate(loss_fn, [batch([2]), batch([2]), batch([2]), batch([2])], seen.append, seeds=[0, 1, 2, 3])
    plain = loss_fn(batch([2])).loss
    assert all(torch.equal(s, plain * 0.25) and torch.equal(s, plain / 4) for s in seen)


# ------------------------------------------------------------------------------------------
# Durable checkpoints
# ------------------------------------------------------------------------------------------
def test_a_checkpoint_is_flushed_to_disk_before_it_is_renamed_and_before_rotation(tmp_path, monkeypatch):
    """Read from the code path: every file of the new checkpoint and its folder are fsynced before
    the rename that publishes it, the parent after it, and only then is the oldest checkpoint
    deleted."""
    from lora.common import files
    from lora.training import checkpoints

    events = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, checkpoints.shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        return real_replace(a, b)

    def rmtree(p, *a, **k):
        events.append(("rmtree", str(p)))
        return real_rmtree(p, *a, **k)

    class Saver:
        def save_pretrained(self, folder):
            Path(folder, "adapter_model.safetensors").write_bytes(b"w" * 100)
            Path(folder, "adapter_config.json").write_text("{}")

        def state_dict(self):
            return {"x": 1}

    class Cfg:
        def save(self, path):
            Path(path).write_text("config")

    root = tmp_path / "checkpoints"
    for step in (1, 2):
        checkpoints.save_checkpoint(root, Saver(), Saver(), Saver(), None, Cfg(),
                                    {"global_step": step}, keep=2)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    monkeypatch.setattr(checkpoints.shutil, "rmtree", rmtree)
    checkpoints.save_checkpoint(root, Saver(), Saver(), Saver(), None, Cfg(), {"global_step": 3}, keep=2)
    new = root / "step-000003"
    publish = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(new))
    tmp = Path(events[publish][1])
    synced_before = {Path(e[1]) for e in events[:publish] if e[0] == "fsync"}
    for f in new.iterdir():
        assert tmp / f.name in synced_before, f"{f.name} was not flushed before the checkpoint was published"
    assert tmp in synced_before  # the folder's entries
    assert ("fsync", str(root)) in events[publish:]  # the rename itself
    delete = next(i for i, e in enumerate(events) if e[0] == "rmtree")
    assert events[delete][1] == str(root / "step-000001") and delete > publish
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000003"]


# ------------------------------------------------------------------------------------------
# TensorBoard after a resume
# ------------------------------------------------------------------------------------------
def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path, tiny_model_dir, example_data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lora import train_lora

    out = tmp_path / "out"
    assert train_lora.main(_train_args(tiny_model_dir, example_data_dir, out)) == 0
    assert train_lora.main(_train_args(tiny_model_dir, example_data_dir, out, "--resume_from_checkpoint",
                                       out / "checkpoints" / "step-000002")) == 0
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 2
    acc = EventAccumulator(str(out / "logs"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4], steps
    lines = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines if "lr" in e] == [1, 2, 3, 4]  # (as metrics.jsonl already was)
