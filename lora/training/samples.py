"""Samples during training: hear the run learn.

At step 0 (the base model: LoRA at its init is the identity) and then every
``training.sample_every`` optimizer steps ('auto': at every validation), the run generates its
sample prompts (``training.sample_prompts``, by default up to 3 held-out captions) with fixed seeds
(``training.seed`` + i) for ``training.sample_seconds`` each, with the sampling settings of the
generation section, through the one generation engine (lora.generation.engine; its static
key/value-cache decoder). They land in ``output_dir/samples/step-NNNNNN/`` (sample_00.wav, ... and
manifest.json), in TensorBoard (audio, mixed to mono) and in logs/metrics.jsonl (time taken,
copy check). Each sample is checked against the training clips' tokens
(lora.scoring.copy_check); the log warns when the samples reproduce training audio more than the
base model's samples at step 0 did.

Sampling must not change training, and does not (tests/training/test_samples.py: the losses of a
run are bit-identical with samples on and off):

* the model generates as it trains: the adapter unmerged, no weight touched, under no_grad
  (inference mode) and in eval mode; afterwards every module's train/eval flag is restored as it
  was;
* its random numbers come from each sample's own ``torch.Generator``, and the global CPU (and
  CUDA) random states are saved before and restored after (``torch.random.fork_rng``);
* no autocast is left on: a decoder stored in bf16 (training.base_weights_dtype) generates under
  a bf16 autocast of its own, entered and left here; any other decoder in float32 without one;
* no cache or compiled graph is shared: the static decoder allocates its own key/value buffers per
  call and calls the decoder's modules directly (not the torch.compile'd forward), and the
  training step keeps none.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from lora.common.cli import log
from lora.common.files import atomic_dir, atomic_path, atomic_write_json
from lora.config import Config
from lora.dataprep.audio import normalize_peak, save_wav
from lora.generation.engine import encode_prompts, generate
from lora.generation.requests import Request, SamplingSettings, temperature_problem
from lora.modeling.loading import family_for
from lora.modeling.window import checked_window
from lora.scoring import copy_check

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lora.modeling.musicgen import ModelInfo

SAMPLES_DIR = "samples"
MANIFEST = "manifest.json"
DEFAULT_PROMPTS = 3
# 'auto' on a CPU: samples only for decoders this small (the built-in tiny models: about a second
# per validation); musicgen-small on a 2-core CPU would spend about a minute (BENCHMARKS.md)
AUTO_CPU_MAX_DECODER_PARAMS = 50_000_000


def step_dir(out: Path, step: int) -> Path:
    return Path(out) / SAMPLES_DIR / f"step-{int(step):06d}"


def config_problems(cfg: Config) -> list[str]:
    """training.sample_every must be 'auto', 0 or a whole number; sampling needs a temperature >
    0."""
    t, g = cfg.training, cfg.generation
    every = str(t.sample_every).strip().lower()
    if every != "auto" and not (every.isdigit() and int(every) >= 0):
        return [f"training.sample_every must be 'auto' (at every validation), 0 (no samples) or a "
                f"whole number of optimizer steps (got {t.sample_every!r})"]
    if every == "0":
        return []
    problem = temperature_problem(g.temperature, g.do_sample, "generation.temperature (training "
                                                             "samples use it; --sample_every 0 "
                                                             "turns them off)")
    return [problem] if problem else []


def choose_prompts(cfg: Config, records) -> tuple[list[str], str]:
    """(prompts, where they came from): training.sample_prompts, else up to DEFAULT_PROMPTS
    distinct held-out captions, else training captions, else one unconditional sample."""
    given = [p.strip() for p in cfg.training.sample_prompts or [] if str(p).strip()]
    if given:
        return given, "training.sample_prompts"
    for split in ("valid", "train"):
        texts = list(dict.fromkeys(r.text.strip() for r in records if r.split == split and r.text.strip()))
        if texts:
            return texts[:DEFAULT_PROMPTS], f"{'held-out' if split == 'valid' else 'training'} captions"
    return [""], "no captions in the data: one unconditional sample"


def resolve_every(cfg: Config, eval_every: int, device: torch.device, decoder_params: int) -> tuple[int, str]:
    """(sample every N optimizer steps, 0 = off; why)."""
    every = str(cfg.training.sample_every).strip().lower()
    if every != "auto":
        n = int(every)
        return n, ("off (training.sample_every 0)" if n == 0 else f"every {n} steps (training.sample_every)")
    if device.type != "cpu" or decoder_params <= AUTO_CPU_MAX_DECODER_PARAMS:
        return eval_every, f"at every validation (every {eval_every} steps; training.sample_every auto)"
    return 0, (f"off on a CPU for a decoder of {decoder_params / 1e6:.0f}M parameters (each round "
               f"would take about a minute or more: BENCHMARKS.md); --sample_every N turns them on")


@dataclass
class Sampler:
    """The samples of one run (every process holds one; only the main process renders)."""

    out: Path
    prompts: list
    seeds: list
    seconds: float
    every: int
    sampling: SamplingSettings
    max_window: float
    extend_stride: float
    index: Optional[copy_check.CopyIndex]
    min_seconds: float
    base_share: Optional[float] = None    # mean near-copy share of the step-0 samples
    times: list = field(default_factory=list)

    def due(self, step: int, total_steps: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == total_steps)

    # ------------------------------------------------------------------------------------------
    def render(self, model: nn.Module, processor, info: ModelInfo, step: int, epoch: float,
               runlog) -> dict:
        """Generate, write and log the samples of ``step``; returns the metrics.jsonl entry."""
        t0 = time.perf_counter()
        results = self._generate(model, processor, info)
        seconds = time.perf_counter() - t0
        self.times.append(seconds)
        entries = []
        with atomic_dir(step_dir(self.out, step)) as tmp:
            for i, res in enumerate(results):
                name = f"sample_{i:02d}.wav"
                wav = normalize_peak(res.audio, -1.0)
                save_wav(tmp / name, wav, info.sample_rate)
                check = self.index.check(res.codes, self.min_seconds) if self.index else None
                entries.append({"file": name, "prompt": res.request.prompt, "seed": res.request.seed,
                                "copy": check})
                if runlog is not None and runlog.tb is not None:
                    runlog.tb.add_audio(f"samples/{i:02d} {res.request.prompt[:48]}",
                                        np.clip(wav.mean(axis=0), -1, 1), step, info.sample_rate)
            summary = copy_check.summarize([e["copy"] for e in entries]) if self.index else None
            atomic_write_json(tmp / MANIFEST, {
                "step": step, "epoch": round(epoch, 4), "base": step == 0, "seconds": self.seconds,
                "generation_seconds": round(seconds, 3), "sampling": asdict(self.sampling),
                "decoding": results[0].decoding, "copy_summary": summary, "samples": entries})
        entry = {"step": step, "epoch": round(epoch, 4),
                 "sample_dir": str(step_dir(self.out, step).relative_to(self.out)),
                 "sample_time_s": round(seconds, 3)}
        if summary is not None and summary["near"] is not None:
            entry.update(sample_copy_share=summary["near"]["mean_share"],
                         sample_longest_copy_s=summary["near"]["longest"]["longest_s"],
                         sample_longest_exact_s=summary["exact"]["longest"]["longest_s"])
        if runlog is not None:
            runlog.add(entry, "samples")
        log.info("step %d: %d sample(s) of %.1f s in %.1f s -> %s", step, len(results), self.seconds,
                 seconds, step_dir(self.out, step))
        self._warn_if_copying(step, summary)
        return entry

    def _generate(self, model: nn.Module, processor, info: ModelInfo) -> list:
        """The engine's Results of the sample requests, with training's state left as it was."""
        import torch

        fam = family_for(info)
        dev = fam.decoder_param(model).device
        reqs = [Request(prompt=p, seed=s, duration=self.seconds, sampling=self.sampling)
                for p, s in zip(self.prompts, self.seeds)]
        with sampling_state(model, dev):
            with torch.inference_mode():
                encoded = {p: (h.to(dev), m.to(dev))
                           for p, (h, m) in encode_prompts(model, processor, self.prompts).items()}
            with _autocast(fam.decoder_param(model)):
                return generate(model, processor, info, reqs, batch_size=len(reqs),
                                max_window=self.max_window, extend_stride=self.extend_stride,
                                progress=False, decoding="static", encoded=encoded)

    def _warn_if_copying(self, step: int, summary: Optional[dict]) -> None:
        if summary is None or summary["near"] is None:
            return
        share = summary["near"]["mean_share"]
        if step == 0:
            self.base_share = share
            return
        floor = self.base_share or 0.0
        if summary["near"]["clips_with_copies"] and share > floor:
            top = summary["near"]["longest"]
            log.warning("step %d: the samples start to copy the training audio: %.0f%% of their time "
                        "is in passages of %g s or more that reproduce training clips (longest %.1f "
                        "s, from %s at %.1f s); the base model's samples at step 0: %.0f%%. Consider "
                        "fewer epochs, more data or a lower rank (listen: %s)", step, 100 * share,
                        self.min_seconds, top["longest_s"], top["clip"], top["clip_at_s"],
                        100 * floor, step_dir(self.out, step))


@contextlib.contextmanager
def sampling_state(model: nn.Module, device: torch.device):
    """Eval mode for the duration; afterwards every module's train/eval flag as it was, and the
    global random states (CPU, and the CUDA device's) as they were."""
    import torch

    modes = [(m, m.training) for m in model.modules()]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            model.eval()
            yield
        finally:
            for m, mode in modes:
                m.training = mode


def _autocast(param):
    """A bf16 autocast for a decoder stored in bf16 (its float32 LoRA weights then run in bf16, as in
    the training step); else none (float32 weights generate in float32)."""
    import torch

    if param.dtype == torch.bfloat16:
        return torch.autocast(device_type=param.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def create(cfg: Config, model: nn.Module, info: ModelInfo, device: torch.device, records, clips,
           eval_every: int, main: bool, resumed_at: Optional[int] = None) -> Optional[Sampler]:
    """The run's Sampler, or None when samples are off (logged either way). ``records`` / ``clips``:
    the run's metadata records and their cached clips (same order); the training clips' tokens
    become the copy check's index (main process only). A resumed run drops the sample folders of
    steps after its checkpoint (they belong to the interrupted run's future)."""
    t = cfg.training
    params = sum(p.numel() for p in family_for(info).decoder(model).parameters())
    every, why = resolve_every(cfg, eval_every, device, params)
    log.info("Training samples: %s", why)
    if every == 0:
        return None
    checked_window(t.sample_seconds, info, model, key="training.sample_seconds")
    prompts, source = choose_prompts(cfg, records)
    g = cfg.generation
    sampler = Sampler(out=Path(t.output_dir), prompts=prompts, seeds=[t.seed + i for i in range(len(prompts))],
                      seconds=float(t.sample_seconds), every=every,
                      sampling=SamplingSettings(guidance_scale=g.guidance_scale, temperature=g.temperature,
                                                top_k=g.top_k, top_p=g.top_p, do_sample=g.do_sample),
                      max_window=max(g.max_window, float(t.sample_seconds)),
                      extend_stride=g.extend_stride, index=None,
                      min_seconds=cfg.evaluation.copy_min_seconds)
    log.info("  %d prompt(s) from the %s, %.1f s each, seeds %s: %s", len(prompts), source,
             sampler.seconds, ", ".join(map(str, sampler.seeds)),
             " | ".join(p[:60] or "(unconditional)" for p in prompts))
    if main:
        train = [(r.audio, c.codes) for r, c in zip(records, clips) if c.split == "train"]
        sampler.index = copy_check.CopyIndex.build([a for a, _ in train],
                                                   [copy_check.coarse_tokens(c) for _, c in train],
                                                   info.frame_rate)
        if resumed_at is not None:
            drop_later_samples(sampler.out, resumed_at)
            sampler.base_share = read_base_share(sampler.out)
    return sampler


def drop_later_samples(out: Path, step: int) -> None:
    """Delete the sample folders of steps after ``step`` (a resumed run makes them again)."""
    for folder in sorted((Path(out) / SAMPLES_DIR).glob("step-*")):
        if folder.is_dir() and folder.name[5:].isdigit() and int(folder.name[5:]) > step:
            shutil.rmtree(folder)


def read_base_share(out: Path) -> Optional[float]:
    """The step-0 samples' mean near-copy share, from their manifest (None when missing)."""
    import json

    try:
        m = json.loads((step_dir(out, 0) / MANIFEST).read_text(encoding="utf-8"))
        return float(m["copy_summary"]["near"]["mean_share"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_steps(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete sample folder of a run (one with its manifest), by step."""
    out = []
    for folder in (Path(run) / SAMPLES_DIR).glob("step-*"):
        name = folder.name[5:]
        if folder.is_dir() and name.isdigit() and (folder / MANIFEST).is_file():
            out.append((int(name), folder))
    return sorted(out)


def progression(adapter_dir, out_dir: Path, max_steps: int = 8) -> Optional[dict]:
    """The training samples of the run an adapter came from (its folder's parent, or for a
    checkpoints/step-N folder the run above it), copied into ``out_dir``/training_samples/ so that
    a report there plays them: at most ``max_steps`` steps, the first (the base model) and the last
    among them. None when the run has no samples."""
    import json

    folder = Path(adapter_dir).resolve()
    run = next((p for p in (folder.parent, folder.parent.parent) if (p / SAMPLES_DIR).is_dir()), None)
    steps = list_steps(run) if run is not None else []
    if not steps:
        return None
    if len(steps) > max_steps:
        pick = np.unique(np.round(np.linspace(0, len(steps) - 1, max_steps)).astype(int))
        steps = [steps[i] for i in pick]
    out = []
    for step, src in steps:
        m = json.loads((src / MANIFEST).read_text(encoding="utf-8"))
        entries = []
        for s in m.get("samples", []):
            rel = f"training_samples/{src.name}/{s['file']}"
            (Path(out_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(Path(out_dir) / rel) as tmp:
                shutil.copyfile(src / s["file"], tmp)
            near = (s.get("copy") or {}).get("near") or {}
            entries.append({"wav": rel, "prompt": s["prompt"], "seed": s["seed"],
                            "copy_share": near.get("share")})
        out.append({"step": step, "samples": entries})
    return {"run": str(run), "steps": out,
            "note": f"The samples {run} generated while it trained (lora/training/samples.py): the "
                    f"same prompts and seeds at each step; step 0 is the base model (the adapter at "
                    f"its initialisation changes nothing). Listen for when your style arrives, and "
                    f"for a sample that starts to replay a training clip."}
