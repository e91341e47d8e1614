"""lora/training/samples.py: the samples a run generates at step 0 and at every validation, and
that generating them leaves training exactly as it was (modes, random states, weights, autocast,
grad mode), so a step after sampling computes the same loss, bit for bit."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from lora.config import Config
from lora.dataset import ClipRecord
from lora.training import checkpoints, samples


def _model(tiny_model_dir: Path, precision: str, weights: str, checkpointing: bool = False):
    """The tiny model prepared for training as train_lora prepares it (LoRA with dropout, CPU
    FastDropout and attention, frozen weights in ``weights``, gradient checkpointing when asked), in
    training mode."""
    from lora.modeling.loading import load_base_model
    from lora.training import model_prep

    cfg = Config()
    cfg.model.model_path = str(tiny_model_dir)
    cfg.training.base_weights_dtype = weights
    cfg.training.decoder_dropout = 0.1  # dropout inside the decoder too: eval mode must be undone
    cfg.training.gradient_checkpointing = checkpointing
    model, processor, info = load_base_model(cfg.model)
    torch.manual_seed(0)
    model, params = model_prep.prepare_model(model, cfg, precision, torch.device("cpu"))
    with torch.no_grad():  # a non-zero adapter (B is zero at init)
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    model_prep.set_train_mode(model, cache_text=True)
    return cfg, model, processor, info


def _sampler(cfg: Config, out: Path, index=None, seconds: float = 1.0) -> samples.Sampler:
    g = cfg.generation
    return samples.Sampler(out=out, prompts=["techno drum loop", "ambient pad"], seeds=[5, 6],
                           seconds=seconds, every=2,
                           sampling=samples.SamplingSettings(guidance_scale=g.guidance_scale,
                                                             top_k=g.top_k),
                           max_window=30.0, extend_stride=18.0, index=index, min_seconds=1.0)


def _batch(info, processor, model):
    """A training micro-batch of cached-style inputs (random codes, encoded captions)."""
    from lora.dataset import collate_tokens
    from lora.modeling.loading import family_for

    fam = family_for(info)
    g = torch.Generator().manual_seed(1)
    items = []
    for text in ("techno drum loop", "funky bass"):
        with torch.no_grad():
            h, m = fam.encode_text(model, processor, [text])
        items.append({"codes": torch.randint(0, info.vocab_size, (info.num_codebooks, 60), generator=g),
                      "hidden": h[0], "mask": m[0], "text": text, "dropped": False, "index": len(items)})
    return collate_tokens(items, info.pad_token_id)


def _loss(model, processor, info, batch, autocast):
    from lora.training import step

    torch.manual_seed(123)  # as train_lora seeds every micro-batch
    loss = step.step_loss(model, processor, info, batch, torch.device("cpu"), autocast, True)
    loss.loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return loss.loss.detach().clone(), grads


@pytest.mark.parametrize("precision,weights,checkpointing", [("no", "float32", False),
                                                            ("bf16", "bfloat16", False),
                                                            ("no", "float32", True)])
def test_sampling_leaves_training_untouched(tiny_model_dir, tmp_path, precision, weights, checkpointing):
    from lora.training import model_prep

    cfg, model, processor, info = _model(tiny_model_dir, precision, weights, checkpointing)
    autocast = model_prep.autocast_for(precision, torch.device("cpu"))
    batch = _batch(info, processor, model)
    before_loss, before_grads = _loss(model, processor, info, batch, autocast)
    modes = {n: m.training for n, m in model.named_modules()}
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(77)
    rng = torch.get_rng_state()

    sampler = _sampler(cfg, tmp_path)
    entry = sampler.render(model, processor, info, step=2, epoch=0.5, runlog=None)

    assert torch.equal(torch.get_rng_state(), rng), "sampling consumed the global random state"
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert any(modes.values()) and not all(modes.values())  # (LoRA training, codec in eval)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights_before[k]), k
    assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
    after_loss, after_grads = _loss(model, processor, info, batch, autocast)
    assert torch.equal(before_loss, after_loss)
    assert all(torch.equal(a, b) for a, b in zip(before_grads, after_grads))

    folder = tmp_path / "samples" / "step-000002"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [s["file"] for s in manifest["samples"]] == ["sample_00.wav", "sample_01.wav"]
    assert [s["seed"] for s in manifest["samples"]] == [5, 6] and manifest["decoding"] == "static"
    for s in manifest["samples"]:
        wav, sr = sf.read(folder / s["file"])
        assert sr == info.sample_rate and len(wav) == info.sample_rate  # 1 s
        assert np.abs(wav).max() > 0.5  # peak-normalised audio, not silence
    assert entry["sample_dir"] == "samples/step-000002" and entry["sample_time_s"] > 0
    # the same seeds give the same samples: their randomness is their own
    first = (folder / "sample_00.wav").read_bytes()
    sampler.render(model, processor, info, step=2, epoch=0.5, runlog=None)
    assert (folder / "sample_00.wav").read_bytes() == first


def test_samples_reach_tensorboard_and_metrics(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lora.scoring.copy_check import CopyIndex
    from lora.training.run_log import RunLog

    cfg, model, processor, info = _model(tiny_model_dir, "no", "float32")
    history: list = []
    runlog = RunLog(tmp_path / "logs", history, enabled=True)
    rng = np.random.default_rng(0)
    index = CopyIndex.build(["train/a.wav"], [rng.integers(0, info.vocab_size, 500)], info.frame_rate)
    sampler = _sampler(cfg, tmp_path, index=index)
    sampler.render(model, processor, info, step=0, epoch=0.0, runlog=runlog)
    sampler.render(model, processor, info, step=2, epoch=0.5, runlog=runlog)
    runlog.close()
    lines = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 2] and all("sample_copy_share" in x for x in lines)
    acc = EventAccumulator(str(tmp_path / "logs"), size_guidance={"audio": 0}).Reload()
    tags = acc.Tags()["audio"]
    assert len(tags) == 2 and all(t.startswith("samples/") for t in tags)
    assert sorted(e.step for e in acc.Audio(tags[0])) == [0, 2]
    manifest = json.loads((tmp_path / "samples" / "step-000000" / "manifest.json").read_text())
    assert manifest["base"] is True and manifest["copy_summary"]["n_clips"] == 2
    assert manifest["samples"][0]["copy"]["exact"]["share"] == 0.0  # random training tokens


def test_sample_cadence_and_settings(tmp_path):
    cfg = Config()
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert samples.resolve_every(cfg, 10, cpu, 400_000)[0] == 10          # tiny model on a CPU
    off, why = samples.resolve_every(cfg, 10, cpu, 420_000_000)           # musicgen-small on a CPU
    assert off == 0 and "--sample_every" in why
    assert samples.resolve_every(cfg, 10, gpu, 420_000_000)[0] == 10
    cfg.training.sample_every = "0"
    assert samples.resolve_every(cfg, 10, gpu, 1)[0] == 0
    cfg.training.sample_every = "7"
    assert samples.resolve_every(cfg, 10, cpu, 420_000_000)[0] == 7
    s = replace(_sampler(cfg, tmp_path), every=7)
    assert [n for n in range(0, 31) if s.due(n, 30)] == [0, 7, 14, 21, 28, 30]
    for bad in ("-1", "often", "2.5"):
        cfg.training.sample_every = bad
        assert "training.sample_every" in samples.config_problems(cfg)[0]
    cfg.training.sample_every = "auto"
    cfg.generation.temperature = 0.0
    assert "generation.temperature" in samples.config_problems(cfg)[0]
    cfg.training.sample_every = "0"
    assert samples.config_problems(cfg) == []  # no samples: their settings do not matter


def test_sample_prompts_default_to_held_out_captions():
    def rec(i, split, text):
        return ClipRecord(id=str(i), audio=f"{split}/{i}.wav", text=text, duration=4.0, split=split)

    cfg = Config()
    records = [rec(0, "train", "t0"), rec(1, "valid", "v1"), rec(2, "valid", "v1"), rec(3, "valid", ""),
               rec(4, "valid", "v2"), rec(5, "valid", "v3"), rec(6, "valid", "v4")]
    assert samples.choose_prompts(cfg, records) == (["v1", "v2", "v3"], "held-out captions")
    no_valid_text = [r for r in records if r.split == "train" or not r.text]
    assert samples.choose_prompts(cfg, no_valid_text)[0] == ["t0"]
    assert samples.choose_prompts(cfg, [rec(0, "train", ""), rec(1, "valid", "")])[0] == [""]
    cfg.training.sample_prompts = ["my prompt", "  "]
    assert samples.choose_prompts(cfg, records) == (["my prompt"], "training.sample_prompts")


def test_samples_folder_belongs_to_the_run(tmp_path):
    """--overwrite_output_dir deletes an earlier run's samples with its checkpoints (a new run must
    not show the old run's sounds as its own), but never a file that train_lora.py did not
    write."""
    step = tmp_path / "samples" / "step-000010"
    step.mkdir(parents=True)
    (step / "sample_00.wav").write_bytes(b"RIFF")
    (step / "manifest.json").write_text("{}")
    ours, foreign = checkpoints.earlier_run(tmp_path)
    assert ours == [tmp_path / "samples"] and foreign == []
    (step / "my_notes.txt").write_text("mine")
    (tmp_path / "samples" / "favourites").mkdir()
    _, foreign = checkpoints.earlier_run(tmp_path)
    assert sorted(foreign) == [tmp_path / "samples" / "favourites", step / "my_notes.txt"]
    with pytest.raises(Exception, match="did not write"):
        checkpoints.clear_earlier_run(tmp_path, overwrite=True)
    assert (step / "my_notes.txt").is_file() and (step / "sample_00.wav").is_file()


def test_resumed_run_drops_later_samples(tmp_path):
    for n in (0, 10, 20, 30):
        d = samples.step_dir(tmp_path, n)
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"copy_summary": {"near": {"mean_share": n / 100}}}))
    samples.drop_later_samples(tmp_path, 20)
    assert [s for s, _ in samples.list_steps(tmp_path)] == [0, 10, 20]
    assert samples.read_base_share(tmp_path) == 0.0
    os.remove(samples.step_dir(tmp_path, 0) / "manifest.json")
    assert samples.read_base_share(tmp_path) is None
