"""The web UI's generation engine: one base model in memory with adapters switched onto it, the
Generate form's checks, the A/B requests, and the files it writes (the same writer and names as
inference_lora.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shlex
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lora.common.cli import UserError, clip_text, human_bytes, log
from lora.common.files import atomic_write_text
from lora.config import (
    MAX_PROMPTS,
    MAX_SEED,
    MAX_TEXT_CHARS,
    Config,
    adapter_paths,
    adapter_scales,
    field_problem,
    seed_problem,
    text_problem,
)
from lora.dataprep.audio import audio_info
from lora.generation import engine as generation_engine
from lora.generation import model
from lora.generation import requests as generation_requests
from lora.generation.manifest import ManifestWriter, add_audio_prompt, add_melodies, check_melody_files, check_outputs
from lora.generation.requests import Request, SamplingSettings
from lora.modeling.adapter import (
    adapter_identity,
    check_adapter_files,
    check_adapter_fits,
    check_mix_bases,
    load_lora,
    peft_errors,
    set_adapter_scales,
    set_lora_scale,
)
from lora.modeling.loading import family_for

NO_ADAPTER = "none (base model only)"
MODES = ("A/B: base and fine-tune", "fine-tune only", "base only")
JOB_PREFIX = "gen-"


class StopRequested(UserError):
    """The Stop button was pressed: the decoding loop ends at its next step."""


# ============================================================================================
# Generation: one base model, adapters switched onto it
# ============================================================================================
class Engine:
    """The base model (loaded once per model path and kept) with every adapter used so far loaded
    onto it by peft; one job at a time (the UI's queue serialises them, ``lock`` makes sure)."""

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
            raise UserError("Give a base model: a hub id (facebook/musicgen-small), a local "
                            "folder, or 'tiny'.")
        if model_path == self.model_path:
            return
        cfg = dataclasses.replace(self.cfg,
                                  model=dataclasses.replace(self.cfg.model, model_path=model_path))
        # (the old base is freed before the new one loads)
        self.model = self.processor = self.info = None
        self.adapters, self.model_path = {}, None
        self.model, self.processor, self.info, _ = model.load_generation_model(cfg, adapter_path=None)
        self.model_path = model_path

    @property
    def wrapped(self) -> bool:
        """The base is wrapped in a peft PeftModel (once an adapter was used)."""
        return hasattr(self.model, "get_base_model")

    @property
    def dtype(self):
        return family_for(self.info).decoder_param(self.model).dtype

    def use_adapters(self, paths: list[str]) -> list[dict]:
        """Load each adapter onto the base the first time it is used; each one's identity with its
        peft ``adapter_name``. One adapter is made the active one here; a mix is made active with
        its scales when it generates (``set_adapter_scales``, as inference_lora.py's
        ``load_adapters``)."""
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
                with peft_errors(folder):
                    self.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
            # As inference_lora.py: the adapter's weights in the decoder's dtype (its load casts
            # after attaching).
            model.cast_for_generation(self.model, self.dtype)
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
    # the adapter folders: a list (the multiselect), or one folder as text
    adapter: object
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


def parse_seed(text, count: int = 1) -> int:
    """The seed box: 'random' (or empty) draws one; else a whole number, by the one rule for seeds of
    every script (lora.config.seed_problem: 0..2^32-1, the last of ``count`` samples too)."""
    text = str(text if text is not None else "").strip().lower()
    if text in ("", "random"):
        return random.randrange(2 ** 31)
    try:
        seed = int(text)
    except ValueError:
        raise UserError(f"seed must be a whole number from 0 to {MAX_SEED} or 'random' (got "
                        f"{clip_text(text, 40)!r}).") from None
    problem = seed_problem(seed, count, "seed")
    if problem:
        raise UserError(problem)
    return seed


def form_problems(f: GenForm) -> list[str]:
    """Everything wrong with the form that can be seen before anything loads: every value by the
    schema's ranges and bounds, as inference_lora.py checks its flags (prompts, their number and
    length, durations, samples, the seed)."""
    p = []
    if len(f.prompts or "") > MAX_PROMPTS * MAX_TEXT_CHARS:
        return [f"The prompts box holds {len(f.prompts):,} characters; at most {MAX_PROMPTS:,} prompts "
                f"of {MAX_TEXT_CHARS:,} characters each."]
    prompts = [t.strip() for t in f.prompts.splitlines() if t.strip()]
    if not prompts:
        p.append("Write a prompt: a description of the music (one prompt per line).")
    if len(prompts) > MAX_PROMPTS:
        p.append(f"{len(prompts):,} prompts; at most {MAX_PROMPTS:,} at once.")
    p += [text_problem(t, f"prompt {i + 1}") for i, t in enumerate(prompts[:MAX_PROMPTS])]
    numbers = (("duration", f.duration), ("guidance_scale", f.guidance_scale), ("top_k", f.top_k),
               ("top_p", f.top_p), ("num_samples", f.num_samples), ("temperature", f.temperature))
    empty = [key for key, value in numbers if value is None]
    if empty:
        return p + [f"Give a number for {', '.join(empty)}."]
    for key, value in numbers[:-1]:
        p.append(field_problem("generation", key, value, key))
    if not [x for x in p if x]:
        try:
            parse_seed(f.seed, int(f.num_samples))
        except UserError as e:
            p.append(str(e))
    p.append(generation_requests.temperature_problem(float(f.temperature), True, "temperature"))
    adapters = adapter_list(f.adapter)
    if f.mode != MODES[2] and not adapters:
        p.append(f"Mode '{f.mode}' needs an adapter: pick one in the list (or type its folder), or "
                 f"choose 'base only'.")
    if f.mode != MODES[2]:
        try:
            p += [field_problem("generation", "lora_scale", v, "lora_scale")
                  for v in strengths(f, len(adapters))]
        except UserError as e:
            p.append(str(e))
        if len(adapters) > 1:
            p += check_mix_bases(adapters)  # the same base for all, before anything loads
    if f.audio_prompt:
        # AudioError (a UserError) naming the file when it cannot be read
        audio_info(f.audio_prompt)
    check_melody_files([f.melody], p, "melody")
    return [x for x in p if x]


MELODY_SETTING = "A melody (the melody upload)"


def is_melody_base(model_path) -> bool:
    """Whether the base model named in the form takes a melody, to show the melody upload: read from
    its config.json where it is a folder, else by its name (tiny-melody, facebook/musicgen-melody).
    Only the upload's visibility depends on it; a melody given to a text-only base is refused by
    ``add_melodies`` when it generates."""
    path = str(model_path or "").strip()
    config_file = Path(path).expanduser() / "config.json"
    if config_file.is_file():
        try:
            return bool(family_for(json.loads(config_file.read_text(encoding="utf-8")).get("model_type")).MELODY)
        # not a model we know: the generation says what is wrong
        except (OSError, ValueError, UserError):
            return False
    return "melody" in path.lower()


def adapter_list(value) -> list[str]:
    """The adapter folders picked (none, one or several to mix)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    picked = [str(x or "").strip() for x in items]
    return [x for x in picked if x not in ("", "none", NO_ADAPTER)]


def strengths(f: GenForm, n: int) -> list[float]:
    """One strength per adapter from the strengths box, by --lora_scale's rule (one number per
    adapter; a single 1 serves every adapter); UserError naming the box otherwise."""
    text = str(f.lora_scale if f.lora_scale is not None else "").strip()
    try:
        values = [float(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UserError(f"Adapter strengths (lora_scale): {text!r} is not a list of numbers; give "
                        f"one per adapter, separated by commas (e.g. 0.7, 0.4).") from None
    if not values:
        raise UserError("Adapter strengths (lora_scale): give one strength per adapter (e.g. 1).")
    try:
        return adapter_scales(argparse.Namespace(lora_scale=values), n)
    except UserError as e:
        raise UserError(f"Adapter strengths (lora_scale): {e}") from None


def make_requests(f: GenForm, seed: int, melody: Optional[str] = None) -> list[Request]:
    """The requests inference_lora.py builds from the same prompts and flags (seeds seed, seed+1,
    ... per prompt; ``melody``: the file every one follows, as --melody_audio)."""
    s = SamplingSettings(guidance_scale=float(f.guidance_scale), temperature=float(f.temperature),
                         top_k=int(f.top_k), top_p=float(f.top_p), do_sample=True)
    prompts = [t.strip() for t in f.prompts.splitlines() if t.strip()]
    return [Request(prompt=t, seed=seed + j, duration=float(f.duration), sampling=s,
                    melody_file=melody or "")
            for t in prompts for j in range(int(f.num_samples))]


def cli_command(f: GenForm, g, side: Side, seed: int) -> str:
    """The inference_lora.py command that regenerates this side's files (the settings its manifest
    records)."""
    prompts = [t.strip() for t in f.prompts.splitlines() if t.strip()]
    # each prompt as one token --prompts=TEXT: a prompt such as '--help' stays a prompt
    args = ["python", "lora/inference_lora.py", "--base_model_path", f.model_path.strip(),
            *[f"--prompts={t}" for t in prompts],
            "--seed", str(seed), "--num_samples", str(int(f.num_samples)), "--duration",
            f"{float(f.duration):g}",
            "--guidance_scale", f"{float(f.guidance_scale):g}", "--temperature",
            f"{float(f.temperature):g}",
            "--top_k", str(int(f.top_k)), "--top_p", f"{float(f.top_p):g}", "--batch_size",
            str(g.batch_size),
            "--max_window", f"{g.max_window:g}", "--extend_stride", f"{g.extend_stride:g}",
            "--dtype", g.dtype, "--decoding", g.decoding, "--output_dir", str(side.folder / "cli")]
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


def run_generation(engine: Engine, f: GenForm, out_root: Path, report=lambda
                   *a: None) -> tuple[list[Side], int, bool]:
    """Generate what the form asks into a new folder under out_root/ui: (one Side per model, base
    first in A/B; the first seed; whether Stop ended it). UserError for anything the user can fix,
    before anything is written; after a Stop the files finished before it are kept, with their
    manifest."""
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
        # kept with the job, so its manifest and command point at a file that stays
        if f.audio_prompt:
            job.mkdir(parents=True, exist_ok=True)
            audio_prompt = str(job / ("audio_prompt" + Path(f.audio_prompt).suffix.lower()))
            shutil.copyfile(f.audio_prompt, audio_prompt)
        melody = None
        # kept with the job too, under its own name (the output file names carry its stem)
        if f.melody:
            melody = str(job / "melody" / Path(f.melody).name)
            Path(melody).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f.melody, melody)
        # (the manifest's lora_scale, as the CLI's)
        scale = scales if len(scales) > 1 else (scales or [1.0])[0]
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
    add_melodies(engine.info, requests, MELODY_SETTING, model_cfg=engine.cfg.model)
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
    atomic_write_text(side.folder / "reproduce.sh",
                      f"# regenerates the files of {side.folder / 'manifest.json'}\n"
                                                    f"{side.command}\n")
    hook = engine.on_step(lambda w, nw, s, ns: report(side.label, w, nw, s, ns))
    try:
        with ctx:
            generation_engine.generate(engine.model, engine.processor, engine.info, requests,
                                       batch_size=g.batch_size,
                                max_window=g.max_window, extend_stride=g.extend_stride, progress=False,
                                on_batch=writer.write_batch, decoding=g.decoding, on_step=hook)
    finally:
        side.entries = list(writer.written)


def _adapter_info(engine: Engine, ids: list, scales: list) -> dict:
    """Set the adapters' strengths on the model; the manifest's adapter entry, as inference_lora.py
    writes it (for a mix: each adapter's identity, peft name and scale)."""
    set_lora_scale(engine.model, 1.0)
    if len(ids) == 1:
        set_lora_scale(engine.model, scales[0])
        return dict({k: v for k, v in ids[0].items() if k != "adapter_name"}, scale=scales[0],
                    merged=False)
    set_adapter_scales(engine.model, {one["adapter_name"]: s for one, s in zip(ids, scales)})
    mix = [dict(one, scale=s) for one, s in zip(ids, scales)]
    return {"adapters": mix, "paths": [one["path"] for one in ids], "scales": scales, "merged": False}


UPLOADS = ".gradio"  # under ui_root: gradio's uploads and served copies (GRADIO_TEMP_DIR)


def clean_ui_outputs(ui_root: Path, max_age_s: float, max_bytes: float, keep=()) -> list[Path]:
    """Delete what the UI keeps under ui_root older than ``max_age_s``, then the oldest while all of
    it takes more than ``max_bytes`` (--max_ui_age_days, --max_ui_gb): its generation folders
    (gen-*) and the uploads (each upload's folder under .gradio). Only those are touched, never a
    folder holding a path of ``keep`` (the uploads of the request being served); returns those
    deleted."""
    if not ui_root.is_dir():
        return []
    keep = [Path(k).resolve() for k in keep if k]
    uploads = ui_root / UPLOADS
    items = [q for q in ui_root.iterdir() if q.is_dir() and q.name.startswith(JOB_PREFIX)]
    items += [q for q in uploads.iterdir() if q.is_dir()] if uploads.is_dir() else []
    items = sorted((q for q in items if not any(q.resolve() in k.parents for k in keep)),
                   key=lambda q: q.stat().st_mtime)
    sizes = {q: sum(f.stat().st_size for f in q.rglob("*") if f.is_file()) for q in items}
    total, now, gone = sum(sizes.values()), time.time(), []
    for q in items:
        if now - q.stat().st_mtime > max_age_s or total > max_bytes:
            shutil.rmtree(q, ignore_errors=True)
            total -= sizes[q]
            gone.append(q)
    if gone:
        log.info("UI outputs: deleted %d old folder(s) under %s (%s left)", len(gone), ui_root,
                 human_bytes(total))
    return gone


def list_adapters(out_root: Path) -> list[str]:
    """Every adapter folder under out_root (best_model, final_model, checkpoints, other runs),
    newest first."""
    found = [p.parent for p in out_root.rglob("adapter_config.json")
             if (p.parent / "adapter_model.safetensors").is_file()
             and "ui" not in p.relative_to(out_root).parts[:1]]
    return [str(p) for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


def default_adapter(adapters: list[str], cfg: Config) -> Optional[str]:
    """The adapter a form starts with: the configured one (generation.lora_model_path,
    output/best_model unless changed, as inference_lora.py uses it) when it is listed, else the
    newest best_model, else the newest adapter."""
    configured = adapter_paths(cfg.generation)
    real = {os.path.realpath(a): a for a in adapters}
    if configured and os.path.realpath(configured[0]) in real:
        return real[os.path.realpath(configured[0])]
    best = [a for a in adapters if Path(a).name == "best_model"]
    return (best or adapters or [None])[0]


def download_files(sides: list[Side]) -> list[str]:
    """The files of a job for the Downloads box, each under a name that says its side: gradio serves
    a file under its own name, and the base and fine-tune files of one sample share theirs. Hard
    links (copies where a link cannot be made) in <job>/downloads/: base_<name>.wav,
    fine-tune_<name>.wav."""
    out = []
    for side in sides:
        folder = side.folder.parent / "downloads"
        folder.mkdir(parents=True, exist_ok=True)
        for e in side.entries:
            src, dst = side.folder / e["file"], folder / f"{side.label}_{Path(e['file']).name}"
            if not dst.exists():
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
            out.append(str(dst))
    return out
