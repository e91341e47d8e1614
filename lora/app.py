"""A local web UI: generate with base model and fine-tune side by side (A/B, blind), watch and steer training,
read evaluations. ``bash install.sh --ui`` installs what it needs (gradio); then::

    python lora/app.py                       # http://127.0.0.1:7860, bound to this machine only
    python lora/app.py --listen --port 7860 --auth user:password     # reachable on the LAN (use --auth)

Nothing here decodes on its own: Generate runs lora.generation.generate (the engine of inference_lora.py) on ONE
base model, loaded once and kept; adapters are loaded onto it with peft (``load_adapter``/``set_adapter``) and the
base side of an A/B runs inside peft's ``disable_adapter()``, so no second base is loaded; several adapters are a
mix, all active at once, each at its own strength (as inference_lora.py's ``load_adapters``). The files go under
output/ui/ with the CLI's ManifestWriter (lora/manifest.py: the same manifest fields) and a ``reproduce.sh``
holding the inference_lora.py command that regenerates them. Train and Evaluate run train_lora.py / evaluate.py as
subprocesses with flags, so UI runs and CLI runs are the same thing. GPU work (generation, evaluation) goes through
one queue, one job at a time; waiting jobs show their place in it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "lora"

from lora import generation, training  # noqa: E402
from lora.adapter import adapter_identity, check_adapter_files, check_adapter_fits, check_mix_bases, load_lora, \
    set_adapter_scales, set_lora_scale  # noqa: E402
from lora.audio import audio_info  # noqa: E402
from lora.config import REPO_ROOT, Config, adapter_scales, field_problem, parse_config  # noqa: E402
from lora.generation import Request, SamplingSettings  # noqa: E402
from lora.loading import family_for  # noqa: E402
# The UI writes its files exactly as the CLI does: the same writer, names, audio-prompt and melody steps.
from lora.manifest import ManifestWriter, add_audio_prompt, add_melodies, check_melody_files, \
    check_outputs  # noqa: E402
from lora.report import format_table, loss_figure, summary_rows  # noqa: E402
from lora.utils import UserError, atomic_write_text, human_bytes, human_seconds, log, setup_logging  # noqa: E402

SCRIPTS_DIR = Path(__file__).resolve().parent
NO_ADAPTER = "none (base model only)"
MODES = ("A/B: base and fine-tune", "fine-tune only", "base only")
JOB_PREFIX = "gen-"


class StopRequested(UserError):
    """The Stop button was pressed: the decoding loop ends at its next step."""


# ============================================================================================
# Generation: one base model, adapters switched onto it
# ============================================================================================
class Engine:
    """The base model (loaded once per model path and kept) with every adapter used so far loaded onto it by
    peft; one job at a time (the UI's queue serialises them, ``lock`` makes sure)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model = self.processor = self.info = None
        self.model_path: Optional[str] = None
        self.adapters: dict = {}       # (resolved folder, weights sha256) -> peft adapter name
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def ensure_base(self, model_path: str) -> None:
        model_path = (model_path or "").strip()
        if not model_path:
            raise UserError("Give a base model: a hub id (facebook/musicgen-small), a local folder, or 'tiny'.")
        if model_path == self.model_path:
            return
        cfg = dataclasses.replace(self.cfg, model=dataclasses.replace(self.cfg.model, model_path=model_path))
        self.model = self.processor = self.info = None  # (the old base is freed before the new one loads)
        self.adapters, self.model_path = {}, None
        self.model, self.processor, self.info, _ = generation.load_generation_model(cfg, adapter_path=None)
        self.model_path = model_path

    @property
    def wrapped(self) -> bool:
        """The base is wrapped in a peft PeftModel (once an adapter was used)."""
        return hasattr(self.model, "get_base_model")

    @property
    def dtype(self):
        return family_for(self.info).decoder_param(self.model).dtype

    def use_adapters(self, paths: list[str]) -> list[dict]:
        """Load each adapter onto the base the first time it is used; each one's identity with its peft
        ``adapter_name``. One adapter is made the active one here; a mix is made active with its scales when it
        generates (``set_adapter_scales``, as inference_lora.py's ``load_adapters``)."""
        ids = [self._load_adapter(p) for p in paths]
        set_lora_scale(self.model, 1.0)  # (switches back on what a scale of 0 switched off)
        if len(ids) == 1:
            self.model.set_adapter(ids[0]["adapter_name"])
        return ids

    def _load_adapter(self, path: str) -> dict:
        folder = Path(path).expanduser().resolve()
        adapter_cfg = check_adapter_files(folder)
        ident = adapter_identity(folder)
        key = (str(folder), ident["weights_sha256"])
        if key not in self.adapters:
            device = family_for(self.info).decoder_param(self.model).device
            if not self.wrapped:  # the first adapter wraps the base in a PeftModel
                self.model = load_lora(self.model, folder, is_trainable=False)
                name = "default"
            else:
                base = self.model.get_base_model()
                check_adapter_fits(base, folder, adapter_cfg.get("base_model_name_or_path") or "",
                                   str(getattr(base, "name_or_path", "") or ""))
                name = f"adapter{len(self.adapters)}"
                self.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
            # As inference_lora.py: the adapter's weights in the decoder's dtype (its load casts after attaching).
            generation.cast_for_generation(self.model, self.dtype)
            self.model.to(device)
            self.model.eval()
            self.adapters[key] = name
        return dict(ident, adapter_name=self.adapters[key])

    def on_step(self, report):
        """The decoding loop's hook: stop when asked, else report progress."""
        def hook(window, n_windows, step, n_steps):
            if self.stop.is_set():
                raise StopRequested("Stopped.")
            report(window, n_windows, step, n_steps)
        return hook


@dataclass
class GenForm:
    """What the Generate tab sends (each field is one control)."""

    prompts: str
    model_path: str
    adapter: object              # the adapter folders: a list (the multiselect), or one folder as text
    lora_scale: object           # the strengths, one per adapter: "1" or "0.7, 0.4" (or a number)
    duration: float
    guidance_scale: float
    temperature: float
    top_k: int
    top_p: float
    seed: str
    num_samples: int
    audio_prompt: Optional[str]
    mode: str
    blind: bool = False
    melody: Optional[str] = None  # melody models: the audio file whose tune every sample follows


@dataclass
class Side:
    label: str                   # "base" / "fine-tune"
    folder: Path
    adapters: list               # adapter folders (resolved), [] for the base
    scales: list = field(default_factory=list)
    entries: list = field(default_factory=list)
    command: str = ""


def parse_seed(text) -> int:
    text = str(text if text is not None else "").strip().lower()
    if text in ("", "random"):
        return random.randrange(2 ** 31)
    try:
        return int(float(text)) if float(text).is_integer() else int(text)
    except ValueError:
        raise UserError(f"seed must be a whole number or 'random' (got {text!r}).") from None


def form_problems(f: GenForm) -> list[str]:
    """Everything wrong with the form that can be seen before anything loads."""
    p = []
    if not [t for t in f.prompts.splitlines() if t.strip()]:
        p.append("Write a prompt: a description of the music (one prompt per line).")
    for key, value in (("duration", f.duration), ("guidance_scale", f.guidance_scale), ("top_k", f.top_k),
                       ("top_p", f.top_p), ("num_samples", f.num_samples)):
        p.append(field_problem("generation", key, value, key))
    p.append(generation.temperature_problem(float(f.temperature), True, "temperature"))
    adapters = adapter_list(f.adapter)
    if f.mode != MODES[2] and not adapters:
        p.append(f"Mode '{f.mode}' needs an adapter: pick one in the list (or type its folder), or choose 'base "
                 f"only'.")
    if f.mode != MODES[2]:
        try:
            p += [field_problem("generation", "lora_scale", v, "lora_scale") for v in strengths(f, len(adapters))]
        except UserError as e:
            p.append(str(e))
        if len(adapters) > 1:
            p += check_mix_bases(adapters)  # the same base for all, before anything loads
    if f.audio_prompt:
        audio_info(f.audio_prompt)  # AudioError (a UserError) naming the file when it cannot be read
    check_melody_files([f.melody], p, "melody")
    return [x for x in p if x]


MELODY_SETTING = "A melody (the melody upload)"


def is_melody_base(model_path) -> bool:
    """Whether the base model named in the form takes a melody, to show the melody upload: read from its config.json
    where it is a folder, else by its name (tiny-melody, facebook/musicgen-melody). Only the upload's visibility
    depends on it; a melody given to a text-only base is refused by ``add_melodies`` when it generates."""
    path = str(model_path or "").strip()
    config_file = Path(path).expanduser() / "config.json"
    if config_file.is_file():
        try:
            return bool(family_for(json.loads(config_file.read_text(encoding="utf-8")).get("model_type")).MELODY)
        except (OSError, ValueError, UserError):  # not a model we know: the generation says what is wrong
            return False
    return "melody" in path.lower()


def adapter_list(value) -> list[str]:
    """The adapter folders picked (none, one or several to mix)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    picked = [str(x or "").strip() for x in items]
    return [x for x in picked if x not in ("", "none", NO_ADAPTER)]


def strengths(f: GenForm, n: int) -> list[float]:
    """One strength per adapter from the strengths box, by --lora_scale's rule (one number per adapter; a single 1
    serves every adapter); UserError naming the box otherwise."""
    text = str(f.lora_scale if f.lora_scale is not None else "").strip()
    try:
        values = [float(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UserError(f"Adapter strengths (lora_scale): {text!r} is not a list of numbers; give one per adapter, "
                        f"separated by commas (e.g. 0.7, 0.4).") from None
    if not values:
        raise UserError("Adapter strengths (lora_scale): give one strength per adapter (e.g. 1).")
    try:
        return adapter_scales(argparse.Namespace(lora_scale=values), n)
    except UserError as e:
        raise UserError(f"Adapter strengths (lora_scale): {e}") from None


def make_requests(f: GenForm, seed: int, melody: Optional[str] = None) -> list[Request]:
    """The requests inference_lora.py builds from the same prompts and flags (seeds seed, seed+1, ... per prompt;
    ``melody``: the file every one follows, as --melody_audio)."""
    s = SamplingSettings(guidance_scale=float(f.guidance_scale), temperature=float(f.temperature),
                         top_k=int(f.top_k), top_p=float(f.top_p), do_sample=True)
    prompts = [t.strip() for t in f.prompts.splitlines() if t.strip()]
    return [Request(prompt=t, seed=seed + j, duration=float(f.duration), sampling=s, melody_file=melody or "")
            for t in prompts for j in range(int(f.num_samples))]


def cli_command(f: GenForm, g, side: Side, seed: int) -> str:
    """The inference_lora.py command that regenerates this side's files (the settings its manifest records)."""
    prompts = [t.strip() for t in f.prompts.splitlines() if t.strip()]
    args = ["python", "lora/inference_lora.py", "--base_model_path", f.model_path.strip(), "--prompts", *prompts,
            "--seed", str(seed), "--num_samples", str(int(f.num_samples)), "--duration", f"{float(f.duration):g}",
            "--guidance_scale", f"{float(f.guidance_scale):g}", "--temperature", f"{float(f.temperature):g}",
            "--top_k", str(int(f.top_k)), "--top_p", f"{float(f.top_p):g}", "--batch_size", str(g.batch_size),
            "--max_window", f"{g.max_window:g}", "--extend_stride", f"{g.extend_stride:g}", "--dtype", g.dtype,
            "--decoding", g.decoding, "--output_dir", str(side.folder / "cli")]
    if side.adapters:
        args += ["--lora_model_path", *side.adapters, "--lora_scale", *[f"{s:g}" for s in side.scales],
                 "--merge", "false"]
    else:
        args += ["--lora_model_path", "none"]
    if g.audio_prompt:
        args += ["--audio_prompt", g.audio_prompt]
    if g.melody_audio:
        args += ["--melody_audio", g.melody_audio]
    return shlex.join(args)


def run_generation(engine: Engine, f: GenForm, out_root: Path, report=lambda *a: None) -> tuple[list[Side], int, bool]:
    """Generate what the form asks into a new folder under out_root/ui: (one Side per model, base first in A/B; the
    first seed; whether Stop ended it). UserError for anything the user can fix, before anything is written; after a
    Stop the files finished before it are kept, with their manifest."""
    problems = form_problems(f)
    if problems:
        raise UserError("\n".join(problems))
    seed = parse_seed(f.seed)
    adapters = adapter_list(f.adapter) if f.mode != MODES[2] else []
    scales = strengths(f, len(adapters)) if adapters else []
    with engine.lock:
        engine.stop.clear()
        engine.ensure_base(f.model_path)
        if f.melody:  # a text-only base or a silent tune: refused before anything is written
            add_melodies(engine.info, make_requests(f, seed, f.melody)[:1], MELODY_SETTING)
        dtype = str(engine.dtype).replace("torch.", "")
        job = out_root / "ui" / f"{JOB_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-s{seed}"
        while job.exists():
            job = job.with_name(job.name + "x")
        sides = []
        if f.mode != MODES[1]:
            sides.append(Side("base", job / "base", []))
        ids = engine.use_adapters(adapters) if adapters else []
        if f.mode != MODES[2]:
            sides.append(Side("fine-tune", job / "fine-tune", [one["path"] for one in ids], scales))
        audio_prompt = None
        if f.audio_prompt:  # kept with the job, so its manifest and command point at a file that stays
            job.mkdir(parents=True, exist_ok=True)
            audio_prompt = str(job / ("audio_prompt" + Path(f.audio_prompt).suffix.lower()))
            shutil.copyfile(f.audio_prompt, audio_prompt)
        melody = None
        if f.melody:  # kept with the job too, under its own name (the output file names carry its stem)
            melody = str(job / "melody" / Path(f.melody).name)
            Path(melody).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f.melody, melody)
        scale = scales if len(scales) > 1 else (scales or [1.0])[0]  # (the manifest's lora_scale, as the CLI's)
        g = dataclasses.replace(engine.cfg.generation, lora_scale=scale, merge=False, dtype=dtype,
                                audio_prompt=audio_prompt, melody_audio=melody,
                                normalize=engine.cfg.generation.normalize)
        for side in sides:
            try:
                _generate_side(engine, f, g, side, seed, ids, report)
            except StopRequested:
                return sides, seed, True
    return sides, seed, False


def _generate_side(engine: Engine, f: GenForm, g, side: Side, seed: int, ids: list, report) -> None:
    import contextlib

    requests = make_requests(f, seed, g.melody_audio)
    if g.audio_prompt:
        add_audio_prompt(engine.model, engine.info, g.audio_prompt, requests)
    add_melodies(engine.info, requests, MELODY_SETTING)
    side.folder.mkdir(parents=True, exist_ok=True)
    names = check_outputs(requests, side.folder, overwrite=False)
    adapter_info = None
    if side.adapters:
        adapter_info = _adapter_info(engine, ids, side.scales)
        ctx = contextlib.nullcontext()
    else:
        ctx = engine.model.disable_adapter() if engine.wrapped else contextlib.nullcontext()
    writer = ManifestWriter(g, side.folder, requests, names, engine.model, engine.info, adapter_info)
    side.command = cli_command(f, g, side, seed)
    atomic_write_text(side.folder / "reproduce.sh", f"# regenerates the files of {side.folder / 'manifest.json'}\n"
                                                    f"{side.command}\n")
    hook = engine.on_step(lambda w, nw, s, ns: report(side.label, w, nw, s, ns))
    try:
        with ctx:
            generation.generate(engine.model, engine.processor, engine.info, requests, batch_size=g.batch_size,
                                max_window=g.max_window, extend_stride=g.extend_stride, progress=False,
                                on_batch=writer.write_batch, decoding=g.decoding, on_step=hook)
    finally:
        side.entries = list(writer.written)


def _adapter_info(engine: Engine, ids: list, scales: list) -> dict:
    """Set the adapters' strengths on the model; the manifest's adapter entry, as inference_lora.py writes it (for a
    mix: each adapter's identity, peft name and scale)."""
    set_lora_scale(engine.model, 1.0)
    if len(ids) == 1:
        set_lora_scale(engine.model, scales[0])
        return dict({k: v for k, v in ids[0].items() if k != "adapter_name"}, scale=scales[0], merged=False)
    set_adapter_scales(engine.model, {one["adapter_name"]: s for one, s in zip(ids, scales)})
    mix = [dict(one, scale=s) for one, s in zip(ids, scales)]
    return {"adapters": mix, "paths": [one["path"] for one in ids], "scales": scales, "merged": False}


def clean_ui_outputs(ui_root: Path, max_age_s: float, max_bytes: float, keep: Optional[Path] = None) -> list[Path]:
    """Delete generation folders under ui_root older than ``max_age_s``, then the oldest while all of them take more
    than ``max_bytes``. Only folders this UI made (gen-*) are touched; returns those deleted."""
    if not ui_root.is_dir():
        return []
    jobs = sorted((p for p in ui_root.iterdir() if p.is_dir() and p.name.startswith(JOB_PREFIX) and p != keep),
                  key=lambda p: p.stat().st_mtime)
    sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in jobs}
    total, now, gone = sum(sizes.values()), time.time(), []
    for p in jobs:
        if now - p.stat().st_mtime > max_age_s or total > max_bytes:
            shutil.rmtree(p, ignore_errors=True)
            total -= sizes[p]
            gone.append(p)
    if gone:
        log.info("UI outputs: deleted %d old folder(s) under %s (%s left)", len(gone), ui_root, human_bytes(total))
    return gone


def list_adapters(out_root: Path) -> list[str]:
    """Every adapter folder under out_root (best_model, final_model, checkpoints, other runs), newest first."""
    found = [p.parent for p in out_root.rglob("adapter_config.json")
             if (p.parent / "adapter_model.safetensors").is_file() and "ui" not in p.relative_to(out_root).parts[:1]]
    return [str(p) for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


# ============================================================================================
# Training runs: train_lora.py subprocesses, and what their files say
# ============================================================================================
def list_runs(out_root: Path) -> list[str]:
    """Folders under out_root (itself included) that hold a training run (logs/metrics.jsonl or checkpoints/)."""
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
    newest = training.newest_checkpoint(run) if (run / "checkpoints").is_dir() else None
    for folder in [newest, run / "final_model", run / "best_model"]:
        state = training.read_state(folder) if folder is not None else None
        if state and isinstance(state.get("total_steps"), int):
            return state["total_steps"]
    return None


def run_summary(run: Path, history: list[dict], proc_state: str) -> str:
    """Step, epoch, ETA and best held-out loss of a run, as markdown."""
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "val_loss" in h]
    total = total_steps(run)
    lines = [f"**{run}** — {proc_state}"]
    if train:
        last = train[-1]
        rate = last.get("steps_per_s") or 0
        left = (total - last["step"]) / rate if total and rate > 0 else None
        lines.append(f"step {last['step']}" + (f" / {total}" if total else "") + f" · epoch {last['epoch']:.2f} · "
                     f"train loss {last['loss']:.4f}" + (f" · ETA {human_seconds(left)}" if left is not None
                                                          and 'running' in proc_state else ""))
    if evals:
        best = min(evals, key=lambda h: h["val_loss"])
        base = next((h["val_loss"] for h in evals if h.get("base")), None)
        lines.append(f"best held-out loss **{best['val_loss']:.4f}** (step {best['step']})"
                     + (f" · base model {base:.4f}" if base is not None else ""))
    newest = training.newest_checkpoint(run) if (run / "checkpoints").is_dir() else None
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
    """train_lora.py / evaluate.py subprocesses started from the UI, by the folder they write into."""

    def __init__(self, out_root: Path):
        self.out_root, self.procs, self.lock = out_root, {}, threading.Lock()

    def start(self, key: str, argv: list[str], kind: str) -> Proc:
        with self.lock:
            old = self.procs.get(key)
            if old is not None and old.popen.poll() is None:
                raise UserError(f"A {old.kind} run started here is still running in {key} (pid {old.popen.pid}); "
                                f"stop it first.")
            logs = self.out_root / "ui" / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            log_path = logs / f"{kind}-{Path(key).name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            with open(log_path, "w", encoding="utf-8") as fh:
                popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT), env=env)
            self.procs[key] = Proc(popen, shlex.join(argv), log_path, kind)
            return self.procs[key]

    def state(self, key: str) -> tuple[str, Optional[Proc]]:
        p = self.procs.get(key)
        if p is None:
            return "not started from this UI", None
        rc = p.popen.poll()
        if rc is None:
            return f"{p.kind} running (pid {p.popen.pid})", p
        return {0: f"{p.kind} finished", 130: f"{p.kind} stopped"}.get(rc, f"{p.kind} failed (exit code {rc})"), p

    def stop(self, key: str, wait_s: float = 60.0) -> str:
        """Ctrl-C for the run (SIGINT: train_lora.py ends the step and exits; its checkpoints are whole files);
        SIGTERM if it has not ended after ``wait_s``."""
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


TRAIN_FIELDS = ("data_dir", "model_path", "output_dir", "lora_rank", "lora_alpha", "lora_targets", "learning_rate",
                "num_epochs", "max_steps", "batch_size", "gradient_accumulation_steps", "save_steps", "eval_steps",
                "logging_steps", "mixed_precision")


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
        if isinstance(v, float) and v.is_integer() and key in ("lora_rank", "max_steps", "batch_size", "save_steps",
                                                                 "eval_steps", "logging_steps",
                                                                 "gradient_accumulation_steps"):
            v = int(v)
        argv += [f"--{key}", str(v)]
    return argv


def start_training(procs: Processes, values: dict, config_file: Optional[str]) -> tuple[str, str]:
    """Start train_lora.py into values['output_dir']; refuse (UserError) a folder that holds another run."""
    out = Path(str(values["output_dir"]).strip() or "").expanduser()
    if not str(values["output_dir"]).strip():
        raise UserError("Give an output folder for the run.")
    out = out if out.is_absolute() else (REPO_ROOT / out)
    ours, foreign = training.earlier_run(out) if out.is_dir() else ([], [])
    if ours or foreign:
        raise UserError(f"{out} already holds another training run ({', '.join(p.name for p in ours + foreign)}). "
                        f"Pick it in the run list and resume it, or choose another output folder. Nothing was "
                        f"started and nothing was changed.")
    data = Path(str(values["data_dir"])).expanduser()
    if not (data if data.is_absolute() else REPO_ROOT / data).is_dir():
        raise UserError(f"Data folder not found: {values['data_dir']}. Prepare one with lora/prepare_data.py.")
    values = dict(values, output_dir=str(out))
    p = procs.start(str(out), train_argv(values, config_file), "train")
    return str(out), p.command


def resume_training(procs: Processes, run: str) -> str:
    """Continue a run from its newest checkpoint: train_lora.py with the run's own resolved config.yaml (written at
    its start) + --resume_from_checkpoint latest, the command train_lora.py's interrupt message gives."""
    folder = Path(run)
    if not (folder / "config.yaml").is_file() or training.newest_checkpoint(folder) is None:
        raise UserError(f"{folder} has no checkpoint to resume from (or no config.yaml). Start a new run instead.")
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
    argv = [sys.executable, str(SCRIPTS_DIR / "evaluate.py"), "--compare", "--base_model_path", model_path,
            "--lora_model_path", adapter, "--data_dir", data_dir, "--output_dir", out_dir]
    return argv + (["--skip_generation", "--bootstrap_samples", "200"] if quick else [])


# ============================================================================================
# Server
# ============================================================================================
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Local web UI: generate (A/B base vs fine-tune), train, evaluate.")
    ap.add_argument("--config", default=None, help="config.yaml to read (default: the repository's)")
    ap.add_argument("--output_root", default=str(REPO_ROOT / "output"),
                    help="Folder whose runs and adapters are listed; UI files go to OUTPUT_ROOT/ui")
    ap.add_argument("--listen", action="store_true", help="Bind 0.0.0.0 (reachable from the LAN); default 127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--auth", default=None, help="user:password required to open the UI")
    ap.add_argument("--max_ui_age_days", type=float, default=7.0, help="Delete UI outputs older than this")
    ap.add_argument("--max_ui_gb", type=float, default=5.0, help="Keep UI outputs under this total size")
    ns = ap.parse_args(argv)
    if ns.auth is not None and (":" not in ns.auth or not ns.auth.split(":", 1)[0] or not ns.auth.split(":", 1)[1]):
        ap.error("--auth must be user:password")
    return ns


def load_config(config_file: Optional[str]) -> Config:
    argv = ["--config", config_file] if config_file else []
    cfg, _ = parse_config(argv, description="app")
    return cfg


def _gradio():
    """gradio, imported only when the UI is built (bash install.sh --ui), offline: no analytics."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio as gr
    except ImportError:
        raise UserError("The web UI needs gradio: bash install.sh --ui (pip install -r requirements-ui.txt).") \
            from None
    return gr


def _message(e: BaseException) -> str:
    """What the page shows for a failure: the user's error as it is; anything else by its type and text (the
    traceback goes to the server's log, never to the page)."""
    if isinstance(e, UserError):
        return f"Error: {e}"
    log.error("unexpected error in the UI", exc_info=e)
    return f"Error: Unexpected error ({type(e).__name__}: {e}). The server log has the details; the UI keeps working."


def _pairs(sides: list[Side]) -> list[dict]:
    """Per sample (prompt, seed): {label: file} of each side."""
    rows: dict = {}
    for side in sides:
        for e in side.entries:
            key = f"{e['prompt'][:60]} · seed {e['seed']}"
            rows.setdefault(key, {})[side.label] = str(side.folder / e["file"])
    return [dict(key=k, files=v) for k, v in rows.items()]


def _player_updates(gr, state: dict, key: Optional[str]):
    row = next((r for r in state.get("pairs", []) if r["key"] == key), None)
    order = state.get("order", [])
    out = []
    for i in range(2):
        label = order[i] if i < len(order) else None
        path = row["files"].get(label) if row and label else None
        name = state["names"][i] if i < len(state.get("names", [])) else ""
        out.append(gr.update(value=path, label=name, visible=label is not None))
    return out


def _generate_handler(gr, engine: Engine, out_root: Path, ns):
    def on_generate(prompts, model_path, adapter, lora_scale, duration, guidance, temperature, top_k, top_p, seed,
                    num_samples, audio_prompt, mode, blind, melody, progress=gr.Progress()):
        f = GenForm(prompts or "", model_path or "", adapter or [], lora_scale, duration, guidance, temperature,
                    top_k, top_p, seed, num_samples, audio_prompt, mode, bool(blind), melody or None)
        last = [0.0]

        def report(label, w, nw, s, n):
            if time.time() - last[0] > 0.25 or s == n:
                last[0] = time.time()
                progress((s, n), desc=f"{label}: window {w + 1}/{nw}", unit="steps")

        empty = {"pairs": [], "order": [], "names": []}
        try:
            clean_ui_outputs(out_root / "ui", ns.max_ui_age_days * 86400, ns.max_ui_gb * 2 ** 30)
            sides, first_seed, stopped = run_generation(engine, f, out_root, report)
        except Exception as e:  # every failure becomes a message in the page; the server keeps serving
            return (_message(e), *_player_updates(gr, empty, None), gr.update(choices=[], value=None),
                    gr.update(visible=False), None, empty)
        done = [s for s in sides if s.entries]
        order = [s.label for s in done]
        if f.blind and len(order) == 2:
            random.shuffle(order)
        by_label = {s.label: s for s in done}
        names = [("A" if i == 0 else "B") if f.blind else _side_name(by_label[lab], f) for i, lab in enumerate(order)]
        state = {"pairs": _pairs(done), "order": order, "names": names, "blind": f.blind and len(order) == 2,
                 "real": [_side_name(by_label[lab], f) for lab in order]}
        n_files = sum(len(s.entries) for s in sides)
        lines = [("Stopped: " if stopped else "Done: ") + f"{n_files} file(s), seed {first_seed}"
                 + (f"–{first_seed + int(f.num_samples) - 1}" if int(f.num_samples) > 1 else "")
                 + f", {float(f.duration):g} s each."]
        for s in sides:
            lines.append(f"- {s.label}: `{s.folder / 'manifest.json'}`  \n  CLI: `{s.command}`")
        keys = [r["key"] for r in state["pairs"]]
        files = [p for r in state["pairs"] for p in r["files"].values()] if not state["blind"] else None
        return ("\n".join(lines), *_player_updates(gr, state, keys[0] if keys else None),
                gr.update(choices=keys, value=keys[0] if keys else None), gr.update(visible=state["blind"]), files,
                state)

    return on_generate


def _side_name(side: Side, f: GenForm) -> str:
    if not side.adapters:
        return f"Base model ({f.model_path.strip()})"
    if len(side.adapters) == 1:
        return f"Fine-tune ({Path(side.adapters[0]).name}, lora_scale {side.scales[0]:g})"
    return "Fine-tune (" + " + ".join(f"{Path(a).name} × {s:g}" for a, s in zip(side.adapters, side.scales)) + ")"


def _generate_tab(gr, cfg: Config, engine: Engine, out_root: Path, ns) -> None:
    adapters = list_adapters(out_root) if out_root.is_dir() else []
    g = cfg.generation
    scale = " ".join(f"{float(x):g}" for x in (g.lora_scale if isinstance(g.lora_scale, list) else [g.lora_scale]))
    with gr.Row():
        with gr.Column(scale=1):
            prompts = gr.Textbox(label="Prompts (one per line)", lines=3, elem_id="prompts",
                                 placeholder="lofi hip hop beat with warm piano")
            model_path = gr.Textbox(label="Base model (hub id, folder or 'tiny')", value=cfg.model.model_path,
                                    elem_id="model_path")
            with gr.Row():
                adapter = gr.Dropdown(label="Adapters (pick or type a folder; several = a mix; none = base model)",
                                      choices=adapters, value=adapters[:1], multiselect=True, allow_custom_value=True,
                                      elem_id="adapter", scale=4)
                refresh = gr.Button("Refresh list", elem_id="refresh_adapters", scale=1)
            mode = gr.Radio(list(MODES), value=MODES[0], label="Mode", elem_id="mode")
            blind = gr.Checkbox(label="Blind A/B: hide which is which until revealed", elem_id="blind")
            with gr.Row():
                lora_scale = gr.Textbox(value=scale, label="Strength per adapter (lora_scale; e.g. 1 or 0.7, 0.4)",
                                        elem_id="lora_scale")
                duration = gr.Number(value=g.duration, label="Duration, s (over 30 s: windowed)", elem_id="duration")
                num_samples = gr.Number(value=g.num_samples, precision=0, label="Samples per prompt",
                                        elem_id="num_samples")
            with gr.Row():
                guidance = gr.Number(value=g.guidance_scale, label="Guidance", elem_id="guidance")
                temperature = gr.Number(value=g.temperature, label="Temperature", elem_id="temperature")
                top_k = gr.Number(value=g.top_k, precision=0, label="Top-k", elem_id="top_k")
                top_p = gr.Number(value=g.top_p, label="Top-p", elem_id="top_p")
                seed = gr.Textbox(value="random", label="Seed (number or 'random')", elem_id="seed")
            audio_prompt = gr.File(label="Audio prompt to continue (optional; WAV/FLAC/MP3/OGG)", type="filepath",
                                   elem_id="audio_prompt")
            melody = gr.File(label="Melody to follow (melody models; WAV/FLAC/MP3/OGG)", type="filepath",
                             elem_id="melody_audio", visible=is_melody_base(cfg.model.model_path))
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="generate_btn")
                stop = gr.Button("Stop", variant="stop", elem_id="stop_btn")
        with gr.Column(scale=1):
            status = gr.Markdown(elem_id="gen_status")
            with gr.Row():
                player_a = gr.Audio(label="A", type="filepath", interactive=False, elem_id="player_a")
                player_b = gr.Audio(label="B", type="filepath", interactive=False, elem_id="player_b")
            sample = gr.Dropdown(label="Sample", choices=[], elem_id="sample_pick")
            reveal = gr.Button("Reveal which is which", visible=False, elem_id="reveal_btn")
            files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
            state = gr.State({})
    inputs = [prompts, model_path, adapter, lora_scale, duration, guidance, temperature, top_k, top_p, seed,
              num_samples, audio_prompt, mode, blind, melody]
    go.click(_generate_handler(gr, engine, out_root, ns), inputs,
             [status, player_a, player_b, sample, reveal, files, state], concurrency_id="gpu", concurrency_limit=1,
             show_progress_on=[status])
    # (no output: the running job's own result, "Stopped: ...", is what the page shows; a reply here could arrive
    # after it and overwrite it)
    stop.click(engine.stop.set, None, None, queue=False)
    refresh.click(lambda: gr.update(choices=list_adapters(out_root)), None, [adapter], queue=False)
    # the melody upload: shown for a melody base, and while it holds a file (so that it can be cleared)
    model_path.change(lambda path, mel: gr.update(visible=is_melody_base(path) or bool(mel)), [model_path, melody],
                      [melody], queue=False)
    sample.change(lambda st, key: _player_updates(gr, st, key), [state, sample], [player_a, player_b], queue=False)

    def on_reveal(st, key):
        if not st.get("blind"):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        st = dict(st, names=st["real"], blind=False)
        a, b = _player_updates(gr, st, key)
        files = [p for r in st["pairs"] for p in r["files"].values()]
        return (f"A = {st['real'][0]}  \nB = {st['real'][1]}", a, b, files)

    reveal.click(on_reveal, [state, sample], [status, player_a, player_b, files], queue=False)


def _train_tab(gr, cfg: Config, out_root: Path, procs: Processes, config_file: Optional[str]) -> None:
    runs = list_runs(out_root) if out_root.is_dir() else []
    with gr.Row():
        run = gr.Dropdown(label="Run (pick, or type its output folder)", choices=runs, value=runs[0] if runs else None,
                          allow_custom_value=True, elem_id="run_pick", scale=4)
        refresh = gr.Button("Refresh list", elem_id="refresh_runs", scale=1)
    run_status = gr.Markdown(elem_id="run_status")
    plot = gr.Plot(label="Loss (train and held-out), redrawn while it trains", elem_id="loss_plot")
    with gr.Row():
        stop = gr.Button("Stop run (keeps its checkpoints)", variant="stop", elem_id="stop_run")
        resume = gr.Button("Resume from newest checkpoint", elem_id="resume_run")
    msg = gr.Markdown(elem_id="train_msg")
    log_box = gr.Textbox(label="Log of the run started here", lines=6, interactive=False, elem_id="train_log")
    seen = gr.State(None)
    with gr.Accordion("Start a new run (train_lora.py with these flags; the rest from config.yaml)", open=True):
        defaults = train_defaults(cfg)
        boxes = []
        with gr.Row(equal_height=True):
            for key in TRAIN_FIELDS:
                v = defaults[key]
                kind = gr.Number if isinstance(v, (int, float)) and not isinstance(v, bool) else gr.Textbox
                boxes.append(kind(value=v, label=key, elem_id=f"train_{key}", min_width=160))
        start = gr.Button("Start training", variant="primary", elem_id="start_train")

    def refresh_run(name, last):
        if not name:
            return "Pick a run, or start one below.", gr.skip(), "", last
        folder = Path(name).expanduser()
        history = read_metrics(folder)
        state, p = procs.state(str(folder))
        sig = (str(folder), len(history), state)
        fig = loss_figure(history) if sig != last else gr.skip()
        return run_summary(folder, history, state), fig, log_tail(p.log_path) if p else "", sig

    def on_start(*values):
        try:
            out, command = start_training(procs, dict(zip(TRAIN_FIELDS, values)), config_file)
        except Exception as e:
            return _message(e), gr.skip()
        return (f"Started: `{command}`", gr.update(choices=list_runs(out_root) + [out], value=out))

    def on_stop(name):
        return procs.stop(str(Path(name).expanduser())) if name else "Pick a run first."

    def on_resume(name):
        try:
            return f"Resumed: `{resume_training(procs, str(Path(name).expanduser()))}`" if name else "Pick a run."
        except Exception as e:
            return _message(e)

    timer = gr.Timer(2.0)
    timer.tick(refresh_run, [run, seen], [run_status, plot, log_box, seen], concurrency_id="poll",
               concurrency_limit=None, show_progress="hidden")
    run.change(refresh_run, [run, seen], [run_status, plot, log_box, seen], concurrency_id="poll",
               concurrency_limit=None)
    refresh.click(lambda: gr.update(choices=list_runs(out_root)), None, [run], queue=False)
    start.click(on_start, boxes, [msg, run], concurrency_id="procs", concurrency_limit=None)
    stop.click(on_stop, [run], [msg], concurrency_id="procs", concurrency_limit=None)
    resume.click(on_resume, [run], [msg], concurrency_id="procs", concurrency_limit=None)


def _report_html(folder: Path) -> str:
    report = folder / "report.html"
    if not report.is_file():
        return ""
    return (f'<iframe src="/gradio_api/file={report}" title="report.html" '
            f'style="width:100%;height:640px;border:1px solid #ccc"></iframe>')


def _evaluate_tab(gr, cfg: Config, out_root: Path, procs: Processes) -> None:
    evals = list_evaluations(out_root) if out_root.is_dir() else []
    adapters = list_adapters(out_root) if out_root.is_dir() else []
    pick = gr.Dropdown(label="Evaluation (a folder with results.json)", choices=evals,
                       value=evals[0] if evals else None, allow_custom_value=True, elem_id="eval_pick")
    summary = gr.Textbox(label="Summary (results.json)", lines=10, interactive=False, elem_id="eval_summary")
    report = gr.HTML(elem_id="eval_report")
    with gr.Accordion("Run evaluate.py --compare (base vs adapter)", open=True):
        with gr.Row():
            model = gr.Textbox(value=cfg.model.model_path, label="Base model", elem_id="eval_model")
            adapter = gr.Dropdown(choices=adapters, value=adapters[0] if adapters else None, allow_custom_value=True,
                                  label="Adapter", elem_id="eval_adapter")
            data = gr.Textbox(value=cfg.data.data_dir, label="Data folder", elem_id="eval_data")
            out = gr.Textbox(value=str(out_root / "evaluation"), label="Output folder", elem_id="eval_out")
            quick = gr.Checkbox(label="Held-out likelihood only (fast)", elem_id="eval_quick")
        run_btn = gr.Button("Run evaluate.py --compare", variant="primary", elem_id="eval_run")
    msg = gr.Textbox(label="evaluate.py", lines=6, interactive=False, elem_id="eval_msg")

    def show(folder):
        if not folder:
            return "No evaluation yet: run one below.", ""
        folder = Path(folder).expanduser()
        return evaluation_summary(folder), _report_html(folder)

    def on_run(model_path, adapter_path, data_dir, out_dir, fast):
        """Runs in the GPU queue (a generation waits for it), streaming the log."""
        if not adapter_path or not Path(adapter_path).expanduser().is_dir():
            yield f"Error: Adapter folder not found: {adapter_path or '(none given)'}", gr.skip(), gr.skip(), gr.skip()
            return
        try:
            p = procs.start(str(Path(out_dir).expanduser()), evaluate_argv(model_path, adapter_path, data_dir,
                                                                           out_dir, bool(fast)), "evaluate")
        except Exception as e:
            yield _message(e), gr.skip(), gr.skip(), gr.skip()
            return
        while p.popen.poll() is None:
            time.sleep(1.0)
            yield log_tail(p.log_path), gr.skip(), gr.skip(), gr.skip()
        text = f"$ {p.command}\n(exit code {p.popen.returncode})\n{log_tail(p.log_path)}"
        folder = str(Path(out_dir).expanduser())
        if p.popen.returncode != 0:
            yield text, gr.skip(), gr.skip(), gr.skip()
            return
        yield (text, gr.update(choices=list_evaluations(out_root) + [folder], value=folder), *show(folder))

    pick.change(show, [pick], [summary, report], queue=False)
    run_btn.click(on_run, [model, adapter, data, out, quick], [msg, pick, summary, report], concurrency_id="gpu",
                  concurrency_limit=1)
    return pick, summary, report, show


def build_ui(cfg: Config, out_root: Path, ns):
    """The Blocks app (not yet launched)."""
    out_root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(out_root / "ui" / ".gradio"))  # uploads and served copies
    gr = _gradio()
    engine, procs = Engine(cfg), Processes(out_root)
    with gr.Blocks(title="MusicGen LoRA", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"### MusicGen LoRA · outputs in `{out_root}`")
        with gr.Tabs():
            with gr.Tab("Generate", id="generate", elem_id="tab_generate"):
                _generate_tab(gr, cfg, engine, out_root, ns)
            with gr.Tab("Train", id="train", elem_id="tab_train"):
                _train_tab(gr, cfg, out_root, procs, ns.config)
            with gr.Tab("Evaluate", id="evaluate", elem_id="tab_evaluate"):
                pick, summary, report, show = _evaluate_tab(gr, cfg, out_root, procs)
        demo.load(show, [pick], [summary, report])
    demo.engine, demo.procs = engine, procs
    return demo


def launch(demo, ns, out_root: Path, block: bool = False):
    """Serve on 127.0.0.1 (0.0.0.0 with --listen); only out_root's files (and gradio's own copies) are served."""
    auth = tuple(ns.auth.split(":", 1)) if ns.auth else None
    host = "0.0.0.0" if ns.listen else "127.0.0.1"
    if ns.listen and not auth:
        log.warning("--listen without --auth: anyone on the network can use this UI")
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=ns.port, auth=auth, share=False, inbrowser=False,
                allowed_paths=[str(out_root)], prevent_thread_lock=not block, ssr_mode=False, mcp_server=False,
                footer_links=[], quiet=not block)
    if block:
        demo.procs.stop_all()
    return demo


def main(argv=None) -> int:
    setup_logging()
    ns = parse_args(argv)
    cfg = load_config(ns.config)
    demo = build_ui(cfg, Path(ns.output_root).resolve(), ns)
    launch(demo, ns, Path(ns.output_root).resolve(), block=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
