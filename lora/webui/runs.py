"""The web UI's process manager: train_lora.py and evaluate.py run as subprocesses; what their
folders say (runs, metrics, logs, evaluations) for the Train and Evaluate tabs.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lora.common.cli import UserError, human_seconds
from lora.config import REPO_ROOT, Config
from lora.scoring.plots import heldout_segments
from lora.scoring.report import format_table, summary_rows
from lora.training import checkpoints

SCRIPTS_DIR = Path(__file__).resolve().parent.parent  # lora/: the scripts the UI runs


# ============================================================================================
# Training runs: train_lora.py subprocesses, and what their files say
# ============================================================================================
def list_runs(out_root: Path) -> list[str]:
    """Folders under out_root (itself included) that hold a training run (logs/metrics.jsonl or
    checkpoints/)."""
    cands = [out_root, *[p for p in out_root.glob("*") if p.is_dir()], *out_root.glob("*/*")]
    runs = [p for p in cands if p.is_dir() and p.name != "ui"
            and ((p / "logs" / "metrics.jsonl").is_file() or (p / "checkpoints").is_dir())]
    return [str(p) for p in runs]


def read_metrics(run: Path) -> list[dict]:
    path = run / "logs" / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line being written right now; it is read at the next refresh
                break
    return out


def total_steps(run: Path) -> Optional[int]:
    newest = checkpoints.newest_checkpoint(run) if (run / "checkpoints").is_dir() else None
    for folder in [newest, run / "final_model", run / "best_model"]:
        state = checkpoints.read_state(folder) if folder is not None else None
        if state and isinstance(state.get("total_steps"), int):
            return state["total_steps"]
    return None


def run_summary(run: Path, history: list[dict], proc_state: str) -> str:
    """Step, epoch, ETA and best held-out loss of a run, as markdown."""
    train = [h for h in history if "loss" in h]
    evals = heldout_segments(history)[-1]  # (after a resume onto other held-out clips: those)
    total = total_steps(run)
    lines = [f"**{run}** — {proc_state}"]
    if train:
        last = train[-1]
        rate = last.get("steps_per_s") or 0
        left = (total - last["step"]) / rate if total and rate > 0 else None
        lines.append(f"step {last['step']}" + (f" / {total}" if total else "")
                     + f" · epoch {last['epoch']:.2f} · "
                     f"train loss {last['loss']:.4f}"
                     + (f" · ETA {human_seconds(left)}" if left is not None
                                                          and 'running' in proc_state else ""))
    if evals:
        adapter = [h for h in evals if not (h.get("base") and h["step"] > 0)]
        best = min(adapter or evals, key=lambda h: h["val_loss"])
        base = next((h["val_loss"] for h in reversed(evals) if h.get("base")), None)
        lines.append(f"best held-out loss **{best['val_loss']:.4f}** (step {best['step']})"
                     + (f" · base model {base:.4f}" if base is not None else ""))
    newest = checkpoints.newest_checkpoint(run) if (run / "checkpoints").is_dir() else None
    lines.append(f"newest checkpoint: {newest.name if newest else 'none yet'}")
    if not history:
        lines.append("no metrics yet (logs/metrics.jsonl is written once training starts)")
    return "  \n".join(lines)


@dataclass
class Proc:
    popen: subprocess.Popen
    command: str
    log_path: Path
    kind: str          # "train" / "resume" / "evaluate"


class Processes:
    """train_lora.py / evaluate.py subprocesses started from the UI, by the folder they write
    into."""

    def __init__(self, out_root: Path):
        self.out_root, self.procs, self.lock = out_root, {}, threading.Lock()

    def start(self, key: str, argv: list[str], kind: str) -> Proc:
        with self.lock:
            old = self.procs.get(key)
            if old is not None and old.popen.poll() is None:
                raise UserError(f"A {old.kind} run started here is still running in {key} (pid "
                                f"{old.popen.pid}); stop it first.")
            logs = self.out_root / "ui" / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            log_path = logs / f"{kind}-{Path(key).name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            with open(log_path, "w", encoding="utf-8") as fh:
                popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                         cwd=str(REPO_ROOT), env=env)
            self.procs[key] = Proc(popen, shlex.join(argv), log_path, kind)
            return self.procs[key]

    def state(self, key: str) -> tuple[str, Optional[Proc]]:
        p = self.procs.get(key)
        if p is None:
            return "not started from this UI", None
        rc = p.popen.poll()
        if rc is None:
            return f"{p.kind} running (pid {p.popen.pid})", p
        return {0: f"{p.kind} finished", 130: f"{p.kind} stopped"}.get(rc,
                                                                       f"{p.kind} failed (exit "
                                                                       f"code {rc})"), p

    def stop(self, key: str, wait_s: float = 60.0) -> str:
        """Ctrl-C for the run (SIGINT: train_lora.py ends the step and exits; its checkpoints are
        whole files); SIGTERM if it has not ended after ``wait_s``."""
        p = self.procs.get(key)
        if p is None or p.popen.poll() is not None:
            return "Nothing is running there."
        p.popen.send_signal(signal.SIGINT)
        try:
            p.popen.wait(wait_s)
        except subprocess.TimeoutExpired:
            p.popen.terminate()
            p.popen.wait(30)
        return f"Stopped (exit code {p.popen.returncode})."

    def stop_all(self) -> None:
        for key in list(self.procs):
            self.stop(key, wait_s=20)


def log_tail(path: Path, n: int = 12) -> str:
    if not path.is_file():
        return ""
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()
             if ln.strip() and "%|" not in ln]  # (tqdm bars)
    return "\n".join(lines[-n:])


TRAIN_FIELDS = ("data_dir", "model_path", "output_dir", "lora_rank", "lora_alpha", "lora_targets",
                "learning_rate",
                "num_epochs", "max_steps", "batch_size", "gradient_accumulation_steps",
                "save_steps", "eval_steps", "logging_steps", "mixed_precision")


def train_defaults(cfg: Config) -> dict:
    """The Train form's values, from config.yaml (via the schema)."""
    out = {}
    for key in TRAIN_FIELDS:
        for section in ("data", "model", "training", "lora"):
            if hasattr(getattr(cfg, section), key):
                out[key] = getattr(getattr(cfg, section), key)
                break
    return out


def train_argv(values: dict, config_file: Optional[str]) -> list[str]:
    argv = [sys.executable, str(SCRIPTS_DIR / "train_lora.py")]
    if config_file:
        argv += ["--config", config_file]
    for key in TRAIN_FIELDS:
        v = values[key]
        if isinstance(v, float) and v.is_integer() and key in ("lora_rank", "max_steps",
                                                               "batch_size", "save_steps",
                                                                 "eval_steps", "logging_steps",
                                                                 "gradient_accumulation_steps"):
            v = int(v)
        argv += [f"--{key}", str(v)]
    return argv


def start_training(procs: Processes, values: dict, config_file: Optional[str]) -> tuple[str, str]:
    """Start train_lora.py into values['output_dir']; refuse (UserError) a folder that holds another
    run."""
    out = Path(str(values["output_dir"]).strip() or "").expanduser()
    if not str(values["output_dir"]).strip():
        raise UserError("Give an output folder for the run.")
    out = out if out.is_absolute() else (REPO_ROOT / out)
    ours, foreign = checkpoints.earlier_run(out) if out.is_dir() else ([], [])
    if ours or foreign:
        raise UserError(f"{out} already holds another training run "
                        f"({', '.join(p.name for p in ours + foreign)}). Pick it in the run list "
                        f"and resume it, or choose another output folder. Nothing was started and "
                        f"nothing was changed.")
    data = Path(str(values["data_dir"])).expanduser()
    if not (data if data.is_absolute() else REPO_ROOT / data).is_dir():
        raise UserError(f"Data folder not found: {values['data_dir']}. Prepare one with "
                        f"lora/prepare_data.py.")
    values = dict(values, output_dir=str(out))
    p = procs.start(str(out), train_argv(values, config_file), "train")
    return str(out), p.command


def resume_training(procs: Processes, run: str) -> str:
    """Continue a run from its newest checkpoint: train_lora.py with the run's own resolved
    config.yaml (written at its start) + --resume_from_checkpoint latest, the command
    train_lora.py's interrupt message gives."""
    folder = Path(run)
    if not (folder / "config.yaml").is_file() or checkpoints.newest_checkpoint(folder) is None:
        raise UserError(f"{folder} has no checkpoint to resume from (or no config.yaml). Start a "
                        f"new run instead.")
    argv = [sys.executable, str(SCRIPTS_DIR / "train_lora.py"), "--config", str(folder / "config.yaml"),
            "--output_dir", str(folder), "--resume_from_checkpoint", "latest"]
    return procs.start(str(folder), argv, "resume").command


# ============================================================================================
# Evaluations
# ============================================================================================
def list_evaluations(out_root: Path) -> list[str]:
    return [str(p.parent) for p in sorted(out_root.rglob("results.json"), key=lambda p: p.stat().st_mtime,
                                          reverse=True) if "ui" not in p.relative_to(out_root).parts[:1]]


def evaluation_summary(folder: Path) -> str:
    path = folder / "results.json"
    if not path.is_file():
        return f"No results.json in {folder}."
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        return f"{path} is not readable JSON ({e})."
    return format_table(summary_rows(results))


def evaluate_argv(model_path: str, adapter: str, data_dir: str, out_dir: str, quick: bool) -> list[str]:
    argv = [sys.executable, str(SCRIPTS_DIR / "evaluate.py"), "--compare", "--base_model_path",
            model_path,
            "--lora_model_path", adapter, "--data_dir", data_dir, "--output_dir", out_dir]
    return argv + (["--skip_generation", "--bootstrap_samples", "200"] if quick else [])
