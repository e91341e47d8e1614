"""lora/train_lora.py end to end on the tiny model: artifacts, plain-peft loading, exact resume
after SIGKILL, NaN guard, errors, several processes (torchrun) and when a run validates and
checkpoints; and what it does with the user's files: --overwrite_output_dir deletes only what it
wrote, one run per output folder, damaged checkpoints, a full disk and Ctrl-C are messages, and
TensorBoard shows each step once after a resume. Its parts: tests/training/."""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, TRAIN_SCRIPT, sha1s, subprocess_env, train_args, truncate


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _assert_same_adapter(a: Path, b: Path, atol=1e-5):
    wa, wb = _adapter(a), _adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------
# The trained fixture: artifacts and plain-peft loading
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_artifacts_and_plain_peft_loading(trained_output_dir, tiny_model_dir):
    from peft import PeftModel
    from transformers import MusicgenForConditionalGeneration

    out = trained_output_dir
    for kind in ("best_model", "final_model"):
        d = out / kind
        for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml",
                     "trainer_state.json", "eval_results.json", "README.md"):
            assert (d / name).is_file(), f"{kind}/{name} missing"
        card = (d / "README.md").read_text()
        assert "PeftModel.from_pretrained" in card and "Held-out loss" in card
    # The YAML file given with --config was read (max_steps 4 came only from there); flags were
    # applied.
    state = json.loads((out / "final_model" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    import yaml

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["training"]["max_steps"] == 4 and resolved["lora"]["lora_rank"] == 12
    assert resolved["training"]["output_dir"] == str(out)
    assert resolved["training"]["decoder_dropout"] == 0.0  # the default, logged as applied
    train_log = (out / "logs" / "train.log").read_text()
    assert "Decoder hidden-state dropout: 0 (training.decoder_dropout" in train_log
    import platform

    # a CPU run keeps freed memory (lora.modeling.cpu_speed.keep_freed_memory)
    if platform.libc_ver()[0] == "glibc":
        assert "CPU memory: freed tensors stay in the process" in train_log

    # The adapter loads with plain peft onto the base model its config names, and changes the
    # output.
    ac = json.loads((out / "best_model" / "adapter_config.json").read_text())
    assert Path(ac["base_model_name_or_path"]).resolve() == Path(tiny_model_dir).resolve()
    assert ac["r"] == 12 and ac["lora_alpha"] == 24
    base = MusicgenForConditionalGeneration.from_pretrained(ac["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(out / "best_model"))
    saved = _adapter(out / "best_model")
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # trained, not the zero init
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved)

    # Held-out metrics: base (step 0) first, then every eval_steps; per-codebook losses; best <=
    # base.
    m = _metrics(out)
    evals = [e for e in m if "val_loss" in e]
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert evals[0].get("base") is True
    assert all(f"val_loss_cb{k}" in evals[0] and f"val_ppl_cb{k}" in evals[0] for k in range(4))
    trains = [e for e in m if "loss" in e and "val_loss" not in e]
    assert [e["step"] for e in trains] == [1, 2, 3, 4] and all(e["loss"] == e["loss"] for e in trains)
    # CFG dropout happened in training batches
    assert sum(e["null_cond_frac"] * e["samples"] for e in trains) > 0
    assert state["base_val_loss"] == pytest.approx(evals[0]["val_loss"])
    assert state["best_metric"] == pytest.approx(min(e["val_loss"] for e in evals))
    assert state["best_metric"] < state["base_val_loss"]
    best = json.loads((out / "best_model" / "eval_results.json").read_text())
    assert best["val_loss"] == pytest.approx(state["best_metric"])

    # Logs: TensorBoard events and a loss-curve PNG.
    assert list((out / "logs").glob("events.out.tfevents.*"))
    assert (out / "logs" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Checkpoints: resumable state every save_steps.
    ck = out / "checkpoints" / "step-000004"
    for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                 "rng_state.pt", "trainer_state.json", "config.yaml"):
        assert (ck / name).is_file(), name
    cs = json.loads((ck / "trainer_state.json").read_text())
    assert cs["global_step"] == 4 and "data_epoch" in cs and "step_in_epoch" in cs and cs["log_history"]
    assert torch.load(ck / "optimizer.pt", weights_only=True)["state"]
    assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]  # no temp leftovers


# ------------------------------------------------------------------------------------------
# Resume after SIGKILL == uninterrupted run
# ------------------------------------------------------------------------------------------
def _common(tiny_model_dir, data_dir, out):
    return ["--model_path", str(tiny_model_dir), "--data_dir", str(data_dir), "--output_dir", str(out),
            "--max_steps", "7", "--batch_size", "2", "--gradient_accumulation_steps", "2",
            "--save_steps", "2",
            "--eval_steps", "4", "--logging_steps", "1", "--mixed_precision", "no",
            "--max_duration", "2.5",
            "--learning_rate", "0.003", "--lora_dropout", "0.1", "--cond_dropout", "0.3", "--seed", "5"]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tiny_model_dir, example_data_dir):
    from lora import train_lora

    ref = tmp_path / "ref"
    assert train_lora.main(_common(tiny_model_dir, example_data_dir, ref)) == 0

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT),
                             *_common(tiny_model_dir, example_data_dir, out)],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if list((out / "checkpoints").glob("step-*/trainer_state.json")):
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "final_model").exists(), "the run finished before it could be killed"
    # An incomplete checkpoint folder (no trainer_state.json) must be ignored by 'latest'.
    (out / "checkpoints" / "step-999999").mkdir()

    assert train_lora.main(_common(tiny_model_dir, example_data_dir, out) +
                           ["--resume_from_checkpoint", "latest"]) == 0
    _assert_same_adapter(ref / "final_model", out / "final_model")
    # The log continues without gaps or duplicates and matches the reference run.
    steps = [e["step"] for e in _metrics(out) if "loss" in e]  # (training lines: not validations, not samples)
    assert steps == list(range(1, 8))
    ref_loss = [e["loss"] for e in _metrics(ref) if "loss" in e]
    got_loss = [e["loss"] for e in _metrics(out) if "loss" in e]
    assert got_loss == pytest.approx(ref_loss, abs=1e-5)
    # Only the newest save_total_limit (3) checkpoints are kept.
    assert len([p for p in (out / "checkpoints").glob("step-0*")]) <= 3


# ------------------------------------------------------------------------------------------
# NaN guard, errors
# ------------------------------------------------------------------------------------------
def _short(tiny_model_dir, data_dir, out, *extra):
    """A 4-step fp32 run without checkpoints; flags in ``extra`` replace these defaults (a flag may
    be given once)."""
    return train_args(tiny_model_dir, data_dir, out, *extra, max_steps=4, save_steps=100)


@pytest.mark.slow
def test_nan_loss_is_skipped_counted_and_stops(tmp_path, tiny_model_dir, example_data_dir,
                                               monkeypatch, caplog):
    from lora import train_lora
    from lora.common.cli import UserError
    from lora.modeling import musicgen

    orig = musicgen.codebook_loss
    calls = {"n": 0}

    def nan_on_second_training_step(logits, labels):
        res = orig(logits, labels)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 2:
                res.loss = res.loss * float("nan")
        return res

    monkeypatch.setattr(musicgen, "codebook_loss", nan_on_second_training_step)
    out = tmp_path / "one_nan"
    assert train_lora.main(_short(tiny_model_dir, example_data_dir, out)) == 0
    state = json.loads((out / "final_model" / "trainer_state.json").read_text())
    assert state["nan_steps_total"] == 1 and state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in _adapter(out / "final_model").values())
    assert any("non-finite loss" in r.message for r in caplog.records)
    assert [e["nan_steps_total"] for e in _metrics(out) if "lr" in e] == [0, 1, 1, 1]

    def always_nan(logits, labels):
        res = orig(logits, labels)
        if torch.is_grad_enabled():
            res.loss = res.loss * float("nan")
        return res

    monkeypatch.setattr(musicgen, "codebook_loss", always_nan)
    with pytest.raises(UserError, match="max_nan_steps") as e:
        train_lora.main(_short(tiny_model_dir, example_data_dir, tmp_path / "all_nan",
                               "--max_nan_steps", "2"))
    assert "learning_rate" in str(e.value) and "bf16" in str(e.value)


def test_empty_valid_split_is_a_clear_error(tmp_path, tiny_model_dir, example_data_dir):
    from lora import train_lora
    from lora.common.cli import UserError

    meta = json.loads((example_data_dir / "metadata.json").read_text())
    clips = [dict(c, audio=str(example_data_dir / c["audio"]), split="train") for c in meta["clips"]]
    (tmp_path / "metadata.json").write_text(json.dumps({"clips": clips}))
    with pytest.raises(UserError, match="valid_fraction") as e:
        train_lora.main(_short(tiny_model_dir, tmp_path, tmp_path / "out"))
    assert "never validates on the training" in str(e.value)


def test_out_of_memory_becomes_advice(tmp_path, tiny_model_dir, example_data_dir, monkeypatch):
    from lora import train_lora
    from lora.common.cli import UserError

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_lora, "load_base_model", oom)
    with pytest.raises(UserError) as e:
        train_lora.main(_short(tiny_model_dir, example_data_dir, tmp_path / "out"))
    msg = str(e.value)
    for hint in ("--batch_size", "--max_duration", "--gradient_checkpointing",
                 "--gradient_accumulation_steps"):
        assert hint in msg


def test_bad_settings_are_reported_together(tmp_path):
    from lora import train_lora
    from lora.common.fields import ConfigError

    with pytest.raises(ConfigError) as e:
        train_lora.main(["--batch_size", "0", "--cond_dropout", "1.5", "--eval_steps", "0",
                         "--output_dir", str(tmp_path)])
    msg = str(e.value)
    assert "batch_size" in msg and "cond_dropout" in msg and "eval_steps" in msg


# ------------------------------------------------------------------------------------------
# Several processes: torchrun (gloo, CPU) == one process with the accumulation doubled
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path, tiny_model_dir, example_data_dir):
    from lora import train_lora

    pytest.importorskip("torch.distributed.run")
    args = ["--model_path", str(tiny_model_dir), "--data_dir", str(example_data_dir), "--max_steps", "3",
            "--batch_size", "2", "--eval_steps", "3", "--save_steps", "3", "--logging_steps", "1",
            "--mixed_precision", "no", "--max_duration", "2", "--learning_rate", "0.003", "--seed", "11"]
    one = tmp_path / "one"
    assert train_lora.main(args + ["--output_dir", str(one), "--gradient_accumulation_steps", "2"]) == 0
    two = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2",
                        str(TRAIN_SCRIPT), *args, "--output_dir", str(two),
                        "--gradient_accumulation_steps", "1"],
                       env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_adapter(one / "final_model", two / "final_model")
    # accelerate launch with USAGE.md's `accelerate config` file (2 processes; on this CPU-only
    # machine its MULTI_GPU launcher starts them over gloo) trains exactly what torchrun does, and
    # says that accelerate's mixed_precision (bf16 in the file) is not what decides the precision.
    acc_cfg = tmp_path / "accelerate.yaml"
    acc_cfg.write_text(_usage_accelerate_config(), encoding="utf-8")
    three = tmp_path / "accelerate"
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc_cfg),
                        str(TRAIN_SCRIPT), *args, "--output_dir", str(three),
                        "--gradient_accumulation_steps", "1"],
                       env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_adapter(two / "final_model", three / "final_model", atol=0)
    timing = ("steps_per_s", "sample_time_s")
    steps = lambda out: [{k: v for k, v in e.items() if k not in timing} for e in _metrics(out)]  # noqa: E731
    assert steps(three) == steps(two)  # every logged loss and held-out loss, digit for digit
    s3 = json.loads((three / "final_model" / "trainer_state.json").read_text())
    assert s3["run"]["world_size"] == 2 and s3["precision"] == "no"
    assert "accelerate's mixed_precision setting (bf16) is not used" in (three / "logs"
                                                                         / "train.log").read_text()
    s1 = json.loads((one / "final_model" / "trainer_state.json").read_text())
    s2 = json.loads((two / "final_model" / "trainer_state.json").read_text())
    assert s2["run"]["world_size"] == 2 and s2["effective_batch"] == s1["effective_batch"] == 4
    assert s2["best_metric"] == pytest.approx(s1["best_metric"], abs=1e-5)
    # The logs are the whole step's on every process count: loss, per-codebook losses, samples,
    # null-condition share.
    log1, log2 = ([e for e in _metrics(out) if "lr" in e] for out in (one, two))
    assert [e["step"] for e in log1] == [e["step"] for e in log2] == [1, 2, 3]
    for a, b in zip(log1, log2):
        assert a["samples"] == b["samples"] == 4 and a["null_cond_frac"] == b["null_cond_frac"]
        for key in ["loss"] + [k for k in a if k.startswith("loss_cb")]:
            assert b[key] == pytest.approx(a[key], abs=1e-5), key


def _usage_accelerate_config() -> str:
    """The `accelerate config` file of USAGE.md's multi-GPU recipe (the yaml block after its
    marker)."""
    import re

    text = (ROOT / "USAGE.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- accelerate-config -->\s*```yaml\n(.*?)```", text, flags=re.S)
    assert m, "USAGE.md lost its accelerate config recipe (<!-- accelerate-config --> before a yaml block)"
    return m.group(1)


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_same(tmp_path, tiny_model_dir, example_data_dir):
    from lora import train_lora

    args = _short(tiny_model_dir, example_data_dir, tmp_path / "plain", "--max_steps", "2",
                  "--learning_rate", "0.003")
    assert train_lora.main(args) == 0
    args = _short(tiny_model_dir, example_data_dir, tmp_path / "gc", "--max_steps", "2",
                  "--learning_rate", "0.003", "--gradient_checkpointing")
    assert train_lora.main(args) == 0
    _assert_same_adapter(tmp_path / "plain" / "final_model", tmp_path / "gc" / "final_model")
    assert "gradient checkpointing" in (tmp_path / "gc" / "logs" / "train.log").read_text()


def test_help_lists_the_seed_flags(capsys):
    from lora import train_lora

    with pytest.raises(SystemExit) as e:
        train_lora.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model_path", "--data_dir", "--metadata_file", "--output_dir", "--lora_rank",
                 "--lora_alpha",
                 "--batch_size", "--num_epochs", "--fp16", "--resume_from_checkpoint",
                 "--gradient_checkpointing"):
        assert flag in text


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, tiny_model_dir, example_data_dir):
    from lora import train_lora
    from lora.common.cli import UserError

    with pytest.raises(UserError, match="no complete checkpoint"):
        train_lora.main(_short(tiny_model_dir, example_data_dir, tmp_path / "out",
                               "--resume_from_checkpoint", "latest"))
    with pytest.raises(UserError, match="not a complete checkpoint"):
        train_lora.main(_short(tiny_model_dir, example_data_dir, tmp_path / "out",
                               "--resume_from_checkpoint", str(tmp_path)))


@pytest.mark.slow
def test_fresh_run_does_not_mix_with_an_earlier_run(tmp_path, tiny_model_dir, example_data_dir):
    """An earlier run's checkpoints would be taken for the new run's by 'latest': refuse, or delete
    on request."""
    from lora import train_lora
    from lora.common.cli import UserError

    out = tmp_path / "out"
    (out / "checkpoints" / "step-000500").mkdir(parents=True)
    (out / "checkpoints" / "step-000500" / "trainer_state.json").write_text('{"global_step": 500}')
    (out / "best_model").mkdir()
    with pytest.raises(UserError,
                       match=r"earlier training run.*--resume_from_checkpoint "
                             r"latest.*--overwrite_output_dir"):
        train_lora.main(_short(tiny_model_dir, example_data_dir, out))
    assert (out / "checkpoints" / "step-000500").is_dir()  # nothing deleted without being asked
    assert train_lora.main(_short(tiny_model_dir, example_data_dir, out, "--overwrite_output_dir")) == 0
    assert not (out / "checkpoints" / "step-000500").exists()
    assert (out / "best_model" / "adapter_model.safetensors").is_file()


def test_bad_cadence_settings_name_the_key(tmp_path):
    from lora import train_lora
    from lora.common.fields import ConfigError

    with pytest.raises(ConfigError) as e:
        train_lora.main(["--eval_steps", "ten", "--save_steps", "0", "--save_minutes", "-1",
                         "--output_dir", str(tmp_path / "out")])
    msg = str(e.value)
    assert "training.eval_steps must be 'auto'" in msg and "'ten'" in msg
    assert "training.save_steps must be 'auto'" in msg and "training.save_minutes" in msg


def _checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*"))


@pytest.mark.slow
def test_auto_run_validates_and_checkpoints_ten_times_and_validation_leaves_training_alone(
        tmp_path, tiny_model_dir, example_data_dir):
    """A real 20-step run with the defaults (auto): validations before the first step and at 2, 4,
    ..., 20, a checkpoint at each of those steps, and the banner says so. The same run validating
    and saving only at the end trains bit for bit the same: validation and checkpoints do not touch
    the training's random numbers."""
    from lora import train_lora

    auto = tmp_path / "auto"
    assert train_lora.main(_short(tiny_model_dir, example_data_dir, auto, "--max_steps", "20",
                                  "--eval_steps", "auto",
                                  "--save_steps", "auto", "--save_total_limit", "20")) == 0
    evals = [e["step"] for e in _metrics(auto) if "val_loss" in e]
    assert evals == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert _checkpoint_steps(auto) == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    banner = (auto / "logs" / "train.log").read_text()
    assert ("validation before the first step and every 2 steps (eval_steps auto: about 10 per "
            "run, 10 in this run); checkpoint every 2 steps (save_steps auto: about 10 per run, 10 "
            "in this run) and at least every 30 min"
            in banner)
    rare = tmp_path / "rare"
    assert train_lora.main(_short(tiny_model_dir, example_data_dir, rare, "--max_steps", "20",
                                  "--eval_steps", "1000",
                                  "--save_steps", "1000", "--save_minutes", "0")) == 0
    assert [e["step"] for e in _metrics(rare) if "val_loss" in e] == [0, 20]
    assert _checkpoint_steps(rare) == [20]
    _assert_same_adapter(auto / "final_model", rare / "final_model", atol=0)
    train = lambda out: [{k: v for k, v in e.items() if k != "steps_per_s"} for e in _metrics(out) if "lr" in e]  # noqa
    assert train(auto) == train(rare) and len(train(auto)) == 20


@pytest.mark.slow
def test_wall_time_checkpoints(tmp_path, tiny_model_dir, example_data_dir):
    """save_minutes: a checkpoint whenever that much wall time passed since the last one, whatever
    save_steps says (here 6 microseconds: every step); 0 = only save_steps and the end."""
    from lora import train_lora

    often = tmp_path / "often"
    assert train_lora.main(_short(tiny_model_dir, example_data_dir, often, "--max_steps", "3",
                                  "--save_steps", "1000",
                                  "--save_minutes", "1e-7", "--save_total_limit", "5")) == 0
    assert _checkpoint_steps(often) == [1, 2, 3]
    off = tmp_path / "off"
    assert train_lora.main(_short(tiny_model_dir, example_data_dir, off, "--max_steps", "3",
                                  "--save_steps", "1000",
                                  "--save_minutes", "0", "--save_total_limit", "5")) == 0
    assert _checkpoint_steps(off) == [3]


@pytest.mark.slow
def test_timing_says_where_the_cold_start_went(trained_output_dir):
    """logs/timing.json (bench_train.py --cold_start reads it): every phase of the run from the
    process start, the steps counted as run, and the phases adding up to the whole."""
    t = json.loads((trained_output_dir / "logs" / "timing.json").read_text(encoding="utf-8"))
    for key in ("start-up", "load", "token cache", "LoRA set-up", "base held-out loss",
                "first step", "steady step", "validation", "checkpoints", "final save", "total"):
        assert key in t and t[key] is not None and t[key] >= 0, key
    assert t["steady steps"] == 3  # max_steps 4: the first apart, then 3
    assert t["token cache"] > 0 and t["start-up"] > 0
    summed = [v for k, v in t.items() if k not in ("total", "steady step", "steady steps", "first step")]
    # every figure is rounded to the millisecond, the total too
    rounding = 0.0005 * (len(summed) + 1) + 1e-9
    # nothing is counted twice, little uncounted
    assert t["total"] - 0.5 <= sum(summed) <= t["total"] + rounding
    log_text = (trained_output_dir / "logs" / "train.log").read_text(encoding="utf-8")
    assert "Where the time went: start-up" in log_text


# ------------------------------------------------------------------------------------------
# Data loss: --overwrite_output_dir deletes only what train_lora.py wrote; one run per output folder
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_overwrite_output_dir_never_deletes_a_folder_the_tool_did_not_make(tmp_path, tiny_model_dir,
                                                                          example_data_dir):
    """The issue's command: a user's checkpoints/x/model.th survives --overwrite_output_dir."""
    proj = tmp_path / "proj"
    (proj / "checkpoints" / "x").mkdir(parents=True)
    (proj / "checkpoints" / "x" / "model.th").write_text("w\n")
    before = sha1s(proj)
    r = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--model_path", str(tiny_model_dir), "--data_dir",
                        str(example_data_dir), "--output_dir", str(proj), "--max_steps", "1",
                        "--overwrite_output_dir"], env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    assert "did not write" in r.stderr and str(proj / "checkpoints" / "x") in r.stderr
    assert "Nothing was deleted" in r.stderr and "Traceback" not in r.stderr
    assert sha1s(proj) == before  # model.th is there, unchanged


@pytest.mark.slow
def test_overwrite_deletes_an_earlier_run_but_not_a_file_added_to_it(tmp_path, tiny_model_dir,
                                                                     example_data_dir):
    from lora import train_lora
    from lora.common.cli import UserError

    out = tmp_path / "out"
    assert train_lora.main(train_args(tiny_model_dir, example_data_dir, out)) == 0
    (out / "best_model" / "my_notes.txt").write_text("mine")
    before = sha1s(out)
    with pytest.raises(UserError, match="did not write") as e:
        train_lora.main(train_args(tiny_model_dir, example_data_dir, out, "--overwrite_output_dir"))
    assert "my_notes.txt" in str(e.value)
    assert sha1s(out) == before
    (out / "best_model" / "my_notes.txt").unlink()
    old_ckpt = sorted((out / "checkpoints").iterdir())
    assert train_lora.main(train_args(tiny_model_dir, example_data_dir, out, "--overwrite_output_dir",
                                       # the tool's own files: deleted and rewritten
                                       "--seed", "7")) == 0
    assert json.loads((out / "best_model" / "trainer_state.json").read_text())["run"]["seed"] == 7
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [p.name for p in old_ckpt]


def _hold_lock(out: Path):
    """A second process holding train_lora.py's lock on ``out`` (as a running training does)."""
    code = ("import sys, time; sys.path.insert(0, %r); from pathlib import Path; from "
            "lora.training import checkpoints\nwith checkpoints.output_lock(Path(%r)):\n    "
            "print('locked', flush=True); time.sleep(120)\n"
            % (str(ROOT), str(out)))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=subprocess_env())
    assert p.stdout.readline().strip() == "locked"
    return p


@pytest.mark.slow
def test_a_second_training_on_the_same_folder_stops_at_once(tmp_path, tiny_model_dir, example_data_dir):
    from lora import train_lora
    from lora.common.cli import UserError

    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        t0 = time.monotonic()
        with pytest.raises(UserError) as e:
            train_lora.main(train_args(tiny_model_dir, example_data_dir, out, "--overwrite_output_dir"))
        msg = str(e.value)
        assert str(out) in msg and f"pid {holder.pid}" in msg and "another training run" in msg
        assert time.monotonic() - t0 < 10  # before the model loads
        assert not (out / "logs").exists() and not (out / "checkpoints").exists()  # nothing written
    finally:
        holder.kill()  # a killed run (SIGKILL) ...
        holder.wait()
    # ... does not leave the folder locked
    assert train_lora.main(train_args(tiny_model_dir, example_data_dir, out)) == 0


# ------------------------------------------------------------------------------------------
# Damaged artifacts: a message naming the file; 'latest' falls back to a checkpoint that loads whole
# ------------------------------------------------------------------------------------------
def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["adapter", "optimizer", "state"])
def test_resume_latest_falls_back_to_the_newest_checkpoint_that_loads(damage, short_run, tmp_path,
                                                                      tiny_model_dir,
                                                                      example_data_dir, caplog):
    from lora import train_lora
    from lora.common.cli import UserError

    out = _copy(short_run, tmp_path)
    newest = out / "checkpoints" / "step-000003"
    if damage == "adapter":
        truncate(newest / "adapter_model.safetensors")
    elif damage == "optimizer":
        (newest / "optimizer.pt").write_bytes(b"")  # 0 bytes
    else:
        (newest / "trainer_state.json").write_text("[1, 2, 3]")  # valid JSON, not an object
    # the damaged one named explicitly: a message naming the file
    with pytest.raises(UserError) as e:
        train_lora.main(train_args(tiny_model_dir, example_data_dir, out, "--max_steps", "4",
                                    "--resume_from_checkpoint", newest))
    named = {"adapter": "adapter_model.safetensors", "optimizer": "optimizer.pt",
             "state": "trainer_state.json"}
    assert named[damage] in str(e.value) and "latest" in str(e.value)
    assert train_lora.main(train_args(tiny_model_dir, example_data_dir, out, "--max_steps", "4",
                                       "--resume_from_checkpoint", "latest")) == 0
    text = caplog.text
    assert "step-000003" in text and "Resumed from" in text and str(out / "checkpoints"
                                                                    / "step-000002") in text
    assert json.loads((out / "final_model" / "trainer_state.json").read_text())["global_step"] == 4


def test_max_duration_shorter_than_one_frame_is_a_message(tmp_path, tiny_model_dir, example_data_dir):
    from lora import train_lora
    from lora.common.fields import ConfigError

    with pytest.raises(ConfigError, match="shorter than one codec frame"):
        train_lora.main(train_args(tiny_model_dir, example_data_dir, tmp_path / "out",
                                    "--max_duration", "0.005"))


def test_training_on_a_full_disk_says_how_much_it_needs(small_disk, tiny_model_dir,
                                                        example_data_dir, capsys):
    from lora import train_lora
    from lora.common.cli import run_main

    rc = run_main(train_lora.main, train_args(tiny_model_dir, example_data_dir, small_disk / "out"))
    err = capsys.readouterr().err
    assert rc == 2 and "Not enough free disk space" in err and "training" in err and "needs about" in err


def test_a_full_disk_during_a_checkpoint_is_a_message(tmp_path, tiny_model_dir, example_data_dir,
                                                      monkeypatch, capsys):
    from lora import train_lora
    from lora.common.cli import run_main
    from lora.training import checkpoints

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "checkpoints"))

    monkeypatch.setattr(checkpoints, "save_checkpoint", full)
    rc = run_main(train_lora.main, train_args(tiny_model_dir, example_data_dir, tmp_path / "out"))
    err = capsys.readouterr().err
    assert rc == 2 and "The disk is full" in err and "training writes checkpoints" in err


# ------------------------------------------------------------------------------------------
# Ctrl-C says what was saved and how to continue
# ------------------------------------------------------------------------------------------
def test_ctrl_c_in_training_names_the_checkpoint_and_how_to_resume(tmp_path, tiny_model_dir,
                                                                   example_data_dir,
                                                                   monkeypatch, capsys):
    from lora import train_lora
    from lora.common.cli import run_main
    from lora.training import step

    real = step.step_loss
    calls = {"n": 0}

    def interrupt_at_third_step(model, *a, **k):
        if model.training:
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
        return real(model, *a, **k)

    monkeypatch.setattr(step, "step_loss", interrupt_at_third_step)
    rc = run_main(train_lora.main,
                  train_args(tiny_model_dir, example_data_dir, tmp_path / "out", "--max_steps", "5"))
    err = capsys.readouterr().err
    assert rc == 130
    assert f"the newest checkpoint is {tmp_path / 'out' / 'checkpoints' / 'step-000002'}" in err
    assert "--resume_from_checkpoint latest" in err


# ------------------------------------------------------------------------------------------
# TensorBoard after a resume
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path, tiny_model_dir, example_data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lora import train_lora

    out = tmp_path / "out"
    assert train_lora.main(train_args(tiny_model_dir, example_data_dir, out, max_steps=4,
                                      save_steps=2)) == 0
    assert train_lora.main(train_args(tiny_model_dir, example_data_dir, out, "--resume_from_checkpoint",
                                      out / "checkpoints" / "step-000002", max_steps=4,
                                      save_steps=2)) == 0
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 2
    acc = EventAccumulator(str(out / "logs"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4], steps
    lines = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines if "lr" in e] == [1, 2, 3, 4]  # (as metrics.jsonl already was)
