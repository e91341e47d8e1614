"""The web UI's process manager (lora.webui.runs) without a browser: the Train tab starts
train_lora.py with exactly the form's settings and refuses, before starting anything, a folder that
holds another run; the run summary and the evaluation list read the runs' own files; the Evaluate
tab's command is one evaluate.py accepts. The browser tests: tests/webui/test_app.py."""

from __future__ import annotations

import html
import json
import re
import sys
from pathlib import Path

import pytest

from lora import train_lora
from lora.common.cli import UserError, human_seconds
from lora.config import Config, parse_config
from lora.webui import runs
from tests.helpers import sha1s


def _plain(markdown: str) -> str:
    """What a Markdown box of the page shows (lora.webui.runs.md_text escapes every value)."""
    return html.unescape(re.sub(r"\\(.)", r"\1", markdown))


def _form(tmp_path: Path) -> dict:
    """The Train form as gradio sends it: numbers as floats (the UI's output root: tmp_path)."""
    values = runs.train_defaults(Config(), tmp_path)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    values.update(data_dir=str(data), model_path="tiny", output_dir=str(tmp_path / "run"),
                  lora_rank=8.0, lora_alpha=16.0, max_steps=20.0, batch_size=2.0,
                  gradient_accumulation_steps=4.0, save_steps="5", eval_steps="auto",
                  logging_steps=1.0, learning_rate=0.0003, lora_targets="attention_ffn")
    return values


def test_the_train_form_starts_train_lora_with_exactly_its_settings(tmp_path):
    values = _form(tmp_path)
    argv = runs.train_argv(values, config_file=None)
    assert argv[:2] == [sys.executable, str(runs.SCRIPTS_DIR / "train_lora.py")]
    cfg, _ = parse_config(argv[2:], sections=train_lora.SECTIONS)
    got = {k: getattr(getattr(cfg, s), k) for k in runs.TRAIN_FIELDS
           for s in ("data", "model", "training", "lora") if hasattr(getattr(cfg, s), k)}
    assert got == {k: (str(v) if k in ("save_steps", "eval_steps") else v) for k, v in values.items()}
    assert "--lora_rank=8" in argv  # not "8.0" (one token: a value starting with "-" stays a value)


def test_a_folder_that_holds_another_run_or_a_missing_data_folder_starts_nothing(tmp_path, monkeypatch):
    def started(*a, **k):
        raise AssertionError(f"a process was started: {a}")

    monkeypatch.setattr(runs.subprocess, "Popen", started)
    procs = runs.Processes(tmp_path)
    values = _form(tmp_path)
    done = tmp_path / "run" / "checkpoints" / "step-000002"
    done.mkdir(parents=True)
    (done / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    before = sha1s(tmp_path)
    with pytest.raises(UserError, match="already holds another training run.*resume it"):
        runs.start_training(procs, values, None)
    with pytest.raises(UserError, match="Data folder /no/such/data does not exist"):
        runs.start_training(procs, dict(values, output_dir=str(tmp_path / "new"),
                                        data_dir="/no/such/data"), None)
    with pytest.raises(UserError, match="Give the output folder"):
        runs.start_training(procs, dict(values, output_dir="  "), None)
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        runs.resume_training(procs, str(tmp_path / "new"))
    assert sha1s(tmp_path) == before
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "config.yaml").write_text("training: {}\n")  # stopped before a checkpoint
    before = sha1s(tmp_path)
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        runs.resume_training(procs, str(tmp_path / "started"))
    assert procs.procs == {} and sha1s(tmp_path) == before and not (tmp_path / "ui").exists()
    assert procs.state(str(tmp_path / "run"))[0] == "not started from this UI"


def test_the_run_summary_reads_the_runs_files(tmp_path):
    out = tmp_path / "output"
    run = out / "my_run"
    (run / "logs").mkdir(parents=True)
    lines = [{"step": 0, "val_loss": 6.0, "base": True},
             {"step": 1, "epoch": 0.1, "loss": 5.0, "steps_per_s": 2.0},
             {"step": 4, "epoch": 0.4, "loss": 4.0, "steps_per_s": 2.0},
             {"step": 4, "val_loss": 4.5}, {"step": 8, "val_loss": 4.75}]
    (run / "logs" / "metrics.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 9, "lo')  # a line being written
    ckpt = run / "checkpoints" / "step-000004"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4, "total_steps": 10}))
    (out / "ui" / "logs").mkdir(parents=True)  # the UI's own outputs are not runs
    (out / "ui" / "logs" / "train-my_run.log").write_text("step 1\n")
    assert runs.list_runs(out) == [str(run)]
    history = runs.read_metrics(run)
    assert history == lines  # the half-written line is left for the next refresh
    text = _plain(runs.run_summary(run, history, "train running (pid 1)"))
    assert f"step 4 / 10 · epoch 0.40 · train loss 4.0000 · ETA {human_seconds(3.0)}" in text
    assert "best held-out loss **4.5000** (step 4) · base model 6.0000" in text
    assert "newest checkpoint: step-000004" in text
    assert "ETA" not in runs.run_summary(run, history, "train stopped")
    empty = out / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    assert "no metrics yet" in _plain(runs.run_summary(empty, [], "not started from this UI"))
    assert "newest checkpoint: none yet" in _plain(runs.run_summary(empty, [], ""))


def test_evaluations_are_listed_and_a_damaged_one_is_a_message(tmp_path):
    out = tmp_path / "output"
    ev = out / "evaluation"
    ev.mkdir(parents=True)
    (ev / "results.json").write_text("{not json")
    (out / "ui" / "x").mkdir(parents=True)
    (out / "ui" / "x" / "results.json").write_text("{}")
    assert runs.list_evaluations(out) == [str(ev)]
    assert runs.evaluation_summary(ev).startswith(f"{ev / 'results.json'} is not readable JSON")
    assert runs.evaluation_summary(tmp_path) == f"No results.json in {tmp_path}."


def test_the_evaluate_tabs_command_is_one_evaluate_accepts(tmp_path):
    for quick in (False, True):
        argv = runs.evaluate_argv("tiny", str(tmp_path / "best_model"), str(tmp_path / "data"),
                                  str(tmp_path / "ev"), quick)
        assert argv[:2] == [sys.executable, str(runs.SCRIPTS_DIR / "evaluate.py")]
        cfg, _ = parse_config(argv[2:], sections=("evaluation", "model", "generation", "data"))
        assert cfg.evaluation.compare and cfg.model.model_path == "tiny"
        assert cfg.evaluation.skip_generation == quick and cfg.evaluation.output_dir == str(tmp_path / "ev")


def test_log_tail_leaves_progress_bars_out(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("start\n 10%|#         | 1/10\n\nstep 1 loss 5.0\n 20%|##        | 2/10\nstep 2\n")
    assert runs.log_tail(log, n=2) == "step 1 loss 5.0\nstep 2"
    assert runs.log_tail(tmp_path / "missing.log") == ""
