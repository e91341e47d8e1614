"""The web UI's process manager: train_lora.py and evaluate.py run as subprocesses; what their
folders say (runs, metrics, logs, evaluations) for the Train and Evaluate tabs.
"""

from __future__ import annotations

import html
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lora.common.cli import UserError, clip_text, human_seconds, log
from lora.config import REPO_ROOT, Config, parse_config
from lora.dataset import load_metadata
from lora.scoring.plots import heldout_segments
from lora.scoring.report import format_table, summary_rows
from lora.scoring.settings import EVALUATE_SECTIONS, config_problems
from lora.training import checkpoints, plan, samples

SCRIPTS_DIR = Path(__file__).resolve().parent.parent  # lora/: the scripts the UI runs
MAX_RUNNING = 2  # train / evaluate processes started from the UI that may run at once


def under_root(value, out_root: Path, what: str) -> Path:
    """The folder a form names for writing, which must lie under the UI's output root (USAGE: the
    UI writes only there): relative to out_root, or absolute inside it; symlinks resolved first, so
    neither '../..' nor a link leads out. UserError naming the field otherwise."""
    text = str(value if value is not None else "").strip()
    if not text:
        raise UserError(f"Give the {what}: a folder under {out_root}.")
    path = Path(text).expanduser()
    path = path if path.is_absolute() else out_root / path
    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(out_root))
    if real != root and root not in real.parents:
        raise UserError(f"The {what} {clip_text(text, 200)} is outside the UI's output root {out_root}: "
                        f"the web UI writes only there. Give a folder under it (e.g. "
                        f"{out_root / 'my_run'}). Nothing was started.")
    if real == root / "ui" or root / "ui" in real.parents:
        raise UserError(f"The {what} {clip_text(text, 200)} is inside {root / 'ui'}, where the UI keeps "
                        f"its own files. Give another folder under {out_root}. Nothing was started.")
    return real


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


def md_text(text) -> str:
    """``text`` for a Markdown box, shown as written: HTML escaped (a folder named
    ``<img src=x onerror=...>`` is text, never markup) and Markdown's punctuation backslashed (a
    prompt's ``*`` or ``[x](javascript:...)`` is text, never emphasis or a link). Everything the
    page shows in Markdown that a user or a folder name can set goes through here."""
    text = re.sub(r"([\\`*_{}\[\]()#+!|~-])", r"\\\1", str(text))  # (before the entities)
    return html.escape(text, quote=True).replace("\n", "  \n")



def page_message(e: BaseException) -> str:
    """What the page shows for a failure (plain text: Markdown boxes escape it with md_text): the
    user's error as it is; anything else by its type and text (the traceback goes to the server's
    log, never to the page)."""
    if isinstance(e, UserError):
        return f"Error: {e}"
    log.error("unexpected error in the UI", exc_info=e)
    return f"Error: Unexpected error ({type(e).__name__}: {e}). The server log has the details; the UI keeps working."


def run_summary(run: Path, history: list[dict], proc_state: str) -> str:
    """Step, epoch, ETA and best held-out loss of a run, as markdown (its folder's name escaped)."""
    train = [h for h in history if "loss" in h]
    evals = heldout_segments(history)[-1]  # (after a resume onto other held-out clips: those)
    total = total_steps(run)
    lines = [f"**{md_text(run)}** — {md_text(proc_state)}"]
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
    lines.append(f"newest checkpoint: {md_text(newest.name) if newest else 'none yet'}")
    if not history:
        lines.append("no metrics yet (logs/metrics.jsonl is written once training starts)")
    return "  \n".join(lines)


def newest_samples(run: Path) -> Optional[dict]:
    """The run's training samples to compare: those of its newest sampled step beside step 0's (the
    base model), paired by prompt and seed: {"step", "rows": [{"label", "base", "now", "copy"}]}
    (file paths; "base" None when step 0 is missing); None when the run has no samples yet."""
    steps = samples.list_steps(run)
    if not steps:
        return None
    step, newest = steps[-1]
    base = dict(steps).get(0)

    def manifest(folder):
        try:
            return json.loads((folder / samples.MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # (written atomically: only a folder removed meanwhile)
            return {"samples": []}

    first = manifest(base)["samples"] if base is not None else []
    rows = []
    for s in manifest(newest)["samples"]:
        b = next((x for x in first if x["seed"] == s["seed"] and x["prompt"] == s["prompt"]), None)
        near = (s.get("copy") or {}).get("near") or {}
        copy = (f"copies {100 * near['share']:.0f}% of its time from the training audio (longest "
                f"{near['longest_s']:.1f} s of {near['clip']} at {near['clip_at_s']:.1f} s)"
                if near.get("share") else "no copied passage")
        rows.append({"label": f"{(s['prompt'] or '(unconditional)')[:60]} · seed {s['seed']}",
                     "base": str(base / b["file"]) if b else None, "now": str(newest / s["file"]),
                     "copy": copy})
    return {"step": step, "rows": rows}


@dataclass
class Proc:
    popen: subprocess.Popen
    command: str
    log_path: Path
    kind: str          # "train" / "resume" / "evaluate"


def _stoppable() -> None:
    """In the child, before it runs the script: Ctrl-C (SIGINT) is delivered and ends it as in a
    terminal. A request thread of the server may block signals, and a blocked signal mask is
    inherited across exec: the script would never see Stop's SIGINT."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
            running = [k for k, p in self.procs.items() if p.popen.poll() is None]
            if len(running) >= MAX_RUNNING:
                raise UserError(f"{len(running)} runs started here are still running "
                                f"({', '.join(clip_text(k, 80) for k in running)}); at most "
                                f"{MAX_RUNNING} run at once. Wait for one to finish, or stop it. "
                                f"Nothing was started.")
            logs = self.out_root / "ui" / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            log_path = logs / f"{kind}-{Path(key).name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            with open(log_path, "w", encoding="utf-8") as fh:
                popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                         cwd=str(REPO_ROOT), env=env, preexec_fn=_stoppable)
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


def train_defaults(cfg: Config, out_root: Path) -> dict:
    """The Train form's values, from config.yaml (via the schema); the output folder is under the
    UI's output root (config's, when it is there; else the root itself)."""
    out = {}
    for key in TRAIN_FIELDS:
        for section in ("data", "model", "training", "lora"):
            if hasattr(getattr(cfg, section), key):
                out[key] = getattr(getattr(cfg, section), key)
                break
    try:
        out["output_dir"] = str(under_root(out["output_dir"], out_root, "output folder"))
    except UserError:
        out["output_dir"] = str(out_root)
    return out


def train_argv(values: dict, config_file: Optional[str]) -> list[str]:
    argv = [sys.executable, str(SCRIPTS_DIR / "train_lora.py")]
    if config_file:
        argv += ["--config", config_file]
    for key in TRAIN_FIELDS:
        v = values[key]
        if v is None or (isinstance(v, str) and not v.strip()):
            raise UserError(f"Give a value for {key}.")
        if isinstance(v, float) and v.is_integer() and key in ("lora_rank", "max_steps",
                                                               "batch_size", "save_steps",
                                                                 "eval_steps", "logging_steps",
                                                                 "gradient_accumulation_steps"):
            v = int(v)
        argv += [f"--{key}={v}"]  # (one token: a value starting with '-' stays a value)
    return argv


def check_script_argv(argv: list[str], sections: tuple, rules, data_dir: Optional[str] = None) -> None:
    """A form's command checked before anything starts, with the script's own schema and rules
    (lora.config.parse_config: types, ranges, the rules across settings) and, where it reads one, its
    data folder's metadata: the same ConfigError / UserError the script would print, now shown in the
    page."""
    cfg, _ = parse_config(argv[2:], sections=sections, rules=rules)
    if data_dir is not None:
        load_metadata(cfg.data.data_dir, cfg.data.metadata_file, check_files=False)


def start_training(procs: Processes, values: dict, config_file: Optional[str]) -> tuple[str, str]:
    """Start train_lora.py into values['output_dir'], a folder under the output root; every value
    is checked first as train_lora.py checks it (its schema and rules, the data folder's metadata),
    and a folder that holds another run is refused (UserError: the page shows it; nothing
    starts)."""
    out = under_root(values["output_dir"], procs.out_root, "output folder")
    ours, foreign = checkpoints.earlier_run(out) if out.is_dir() else ([], [])
    if ours or foreign:
        raise UserError(f"{out} already holds another training run "
                        f"({', '.join(p.name for p in ours + foreign)}). Pick it in the run list "
                        f"and resume it, or choose another output folder. Nothing was started and "
                        f"nothing was changed.")
    data = Path(str(values["data_dir"] or "")).expanduser()
    values = dict(values, output_dir=str(out),
                  data_dir=str(data if data.is_absolute() else REPO_ROOT / data))
    argv = train_argv(values, config_file)
    check_script_argv(argv, plan.TRAIN_SECTIONS, lambda cfg, ns: plan.settings_problems(cfg),
                      values["data_dir"])
    p = procs.start(str(out), argv, "train")
    return str(out), p.command


def resume_training(procs: Processes, run: str) -> str:
    """Continue a run from its newest checkpoint: train_lora.py with the run's own resolved
    config.yaml (written at its start) + --resume_from_checkpoint latest, the command
    train_lora.py's interrupt message gives."""
    folder = under_root(run, procs.out_root, "run folder")
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
    argv = [sys.executable, str(SCRIPTS_DIR / "evaluate.py"), "--compare",
            f"--base_model_path={model_path}", f"--lora_model_path={adapter}",
            f"--data_dir={data_dir}", f"--output_dir={out_dir}"]
    return argv + (["--skip_generation", "--bootstrap_samples", "200"] if quick else [])


def start_evaluation(procs: Processes, model_path: str, adapter: str, data_dir: str, out_dir: str,
                     quick: bool) -> Proc:
    """Start evaluate.py --compare into ``out_dir``, a folder under the output root, after checking
    the command as evaluate.py checks it (its schema and rules: the adapter, the folders, the
    ownership of the output folder) and the data folder's metadata."""
    out = under_root(out_dir, procs.out_root, "output folder")
    argv = evaluate_argv(str(model_path or "").strip(), str(adapter or "").strip(),
                         str(data_dir or "").strip(), str(out), quick)
    check_script_argv(argv, EVALUATE_SECTIONS, config_problems, data_dir)
    return procs.start(str(out), argv, "evaluate")
