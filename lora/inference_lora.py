"""Generate music from text with MusicGen and a LoRA adapter; write WAV files and a manifest.

The seed's command (from inside lora/)::

    python inference_lora.py --base_model_path /path/to/musicgen-small --lora_model_path ../output/best_model \\
        --prompts "hip hop 808 beat with trap drums" --output_dir ../output/generated

More::

    --prompts "lofi piano" "dark techno"     several prompts (each gets --num_samples samples)
    --prompts_file prompts.txt               one prompt per line (blank lines and lines starting with # skipped)
    --prompts_file prompts.jsonl             per-prompt settings: {"text": ..., "duration": 20, "seed": 7,
                                             "guidance_scale": 4, "temperature": 1, "top_k": 250, "top_p": 0,
                                             "num_samples": 2}   (.json: a list of such objects or strings)
    --duration 60                            seconds; beyond max_window (30 s) windowed continuation is used
    --audio_prompt intro.wav                 continue a piece (the duration includes it)
    --lora_scale 0.5                         half-strength adapter (0 = base model); --lora_model_path none = base
    --lora_model_path A B --lora_scale 0.7 0.4   mix two adapters (each at its own strength)
    --merge false                            keep LoRA unmerged (default: merged when lora_scale is 1)
    --seed 3 --num_samples 4                 seeds 3, 4, 5, 6; each file's seed is in manifest.json
    --output_format float --normalize false  32-bit float WAVs, no peak normalisation
    --overwrite                              replace existing files (otherwise nothing is generated)

Each file is named ``<prompt-slug>_s<seed>.wav``; ``output_dir/manifest.json`` lists for every file the
prompt, seed, all settings, the model and adapter identity (path + hash of the adapter weights), duration,
generation time and real-time factor. Any sample can be regenerated alone from its seed and settings: on a CPU
token for token in the default dtype too (bf16 on CPUs with AVX512-BF16/AMX); on a GPU in the same batch
(``batch_files``). The manifest records what that needs: dtype, device type, decoding, the padded text length,
the batch, and the torch/transformers/peft versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import time
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "lora"

from lora import config as config_module  # noqa: E402
from lora import generation  # noqa: E402
from lora.adapter import check_adapter_files, check_mix_bases, describe_choice  # noqa: E402
from lora.audio import audio_info, file_hash, load_audio, normalize_peak, peak_db, save_wav  # noqa: E402
from lora.config import ConfigError, GenerationConfig, adapter_paths, adapter_scales, field_problem, \
    parse_config  # noqa: E402
from lora.generation import Request, SamplingSettings, temperature_problem  # noqa: E402
from lora.loading import family_for  # noqa: E402
from lora.prompts import read_prompts_file  # noqa: E402
from lora.utils import UserError, atomic_write_json, check_free_space, check_output_dir, human_seconds, log, \
    on_interrupt, run_main  # noqa: E402

DESCRIPTION = "Generate music with MusicGen + a LoRA adapter (WAV files + manifest.json)."
MANIFEST = "manifest.json"
PER_PROMPT_RANGED = ("duration", "guidance_scale", "top_k", "top_p", "num_samples")
SLUG_MAX_BYTES = 80


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------
@dataclass
class PromptSpec:
    text: str
    where: str          # "--prompts #2" or "prompts.jsonl line 3": used in error messages
    duration: float
    seed: int
    num_samples: int
    sampling: SamplingSettings
    melody: str | None = None  # melody models: the audio file whose tune this prompt follows


def build_prompt_specs(g: GenerationConfig, problems: list[str]) -> list[PromptSpec]:
    entries = [(f"--prompts #{i + 1}" if len(g.prompts) > 1 else "--prompts", {"text": t})
               for i, t in enumerate(g.prompts)]
    if g.prompts_file:
        entries += read_prompts_file(g.prompts_file, problems)
    if not entries and not problems:
        if g.unconditional:
            entries = [("--unconditional", {"text": ""})]
        else:
            problems.append("No prompt given. Pass --prompts \"your description\" (several allowed), or "
                            "--prompts_file FILE, or --unconditional to generate without text.")
    specs = []
    for where, e in entries:
        text = str(e.get("text", "")).strip()
        if not text and not g.unconditional:
            problems.append(f"{where}: the prompt is empty. Write a description of the music, or pass "
                            f"--unconditional to generate without text on purpose.")
            continue
        # Per-prompt settings: the same ranges as the flags they override (the flags were checked by the schema).
        own = [field_problem("generation", k, e[k], f"{where}: {k}") for k in PER_PROMPT_RANGED if k in e]
        if "temperature" in e:
            own.append(temperature_problem(e["temperature"], g.do_sample, f"{where}: temperature"))
        own = [x for x in own if x]
        if own:
            problems += own
            continue
        sampling = SamplingSettings(
            guidance_scale=float(e.get("guidance_scale", g.guidance_scale)),
            temperature=float(e.get("temperature", g.temperature)), top_k=int(e.get("top_k", g.top_k)),
            top_p=float(e.get("top_p", g.top_p)), do_sample=bool(g.do_sample))
        specs.append(PromptSpec(text=text, where=where, duration=float(e.get("duration", g.duration)),
                                seed=int(e.get("seed", g.seed)), num_samples=int(e.get("num_samples", g.num_samples)),
                                sampling=sampling, melody=e.get("melody", g.melody_audio)))
    return specs


# --------------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------------
def slugify(text: str, max_bytes: int = SLUG_MAX_BYTES) -> str:
    """A file-name-safe slug: letters/digits of any script kept (lower-cased), everything else -> '-',
    at most ``max_bytes`` UTF-8 bytes. '' for a text without letters or digits."""
    s = unicodedata.normalize("NFKC", text).lower()
    s = re.sub(r"[^\w]+", "-", s, flags=re.UNICODE).replace("_", "-")
    s = re.sub(r"-{2,}", "-", s).strip("-")
    while len(s.encode("utf-8")) > max_bytes:
        s = s[:-1]
    return s.rstrip("-")


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:6]


def output_names(requests: list[Request]) -> list[str]:
    """``<slug>_s<seed>.wav`` per request (``<slug>_melody-<file stem>_s<seed>.wav`` with a melody); different
    prompts with the same slug get a hash suffix."""
    slugs = {}
    for r in requests:
        if r.prompt not in slugs:
            base = slugify(r.prompt) if r.prompt else "unconditional"
            slugs[r.prompt] = base or f"prompt-{_short_hash(r.prompt)}"
    by_slug: dict[str, set] = {}
    for prompt, slug in slugs.items():
        by_slug.setdefault(slug, set()).add(prompt)
    names = []
    for r in requests:
        slug = slugs[r.prompt]
        if len(by_slug[slug]) > 1:
            slug = f"{slug}-{_short_hash(r.prompt)}"
        if r.melody_file:  # the same prompt and seed with another tune is another piece
            slug = f"{slug}_melody-{slugify(Path(r.melody_file).stem, 40) or _short_hash(r.melody_file)}"
        names.append(f"{slug}_s{r.seed}.wav")
    return names


# --------------------------------------------------------------------------------------------
# Adapter choice
# --------------------------------------------------------------------------------------------
def _flag_given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _default_adapter_path() -> str:
    default = GenerationConfig.__dataclass_fields__["lora_model_path"].default
    return os.path.normpath(config_module.REPO_ROOT / default)


def choose_adapter(g: GenerationConfig, argv: list[str], problems: list[str]) -> tuple[list[str], bool]:
    """(the adapter folders to use: [] for the base model alone, one, or several to mix; whether they come from the
    default lora_model_path, output/best_model: used when it exists, else the base model alone). Problems with them
    are added to ``problems``."""
    paths = adapter_paths(g)
    if not paths:
        return [], False
    try:
        adapter_scales(g, len(paths))
    except ConfigError as e:
        problems.append(str(e))
    explicit = (_flag_given(argv, "--lora_model_path") or len(paths) > 1
                or os.path.normpath(paths[0]) != _default_adapter_path())
    if not explicit and not Path(paths[0]).exists():
        log.warning("No LoRA adapter at the default location %s (nothing trained yet?): generating with the BASE "
                    "MODEL ONLY. Train one with train_lora.py, or pass --lora_model_path FOLDER.", paths[0])
        return [], True
    ok = True
    for path in paths:
        if not Path(path).exists():
            problems.append(f"LoRA adapter folder not found: {path} (lora_model_path). Pass the folder "
                            f"train_lora.py wrote (e.g. ../output/best_model), or --lora_model_path none for the "
                            f"base model alone.")
        elif not Path(path).is_dir():
            problems.append(f"lora_model_path {path} is a file; it must be an adapter folder (with "
                            f"adapter_config.json and adapter_model.safetensors).")
        else:
            try:
                check_adapter_files(path)  # complete and whole, before the model loads
                continue
            except UserError as e:
                problems.append(f"lora_model_path: {e}")
        ok = False
    if ok and len(paths) > 1:
        problems += check_mix_bases(paths)  # the same base for all, before the model loads
    return paths, not explicit


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _load_manifest(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("%s is not readable JSON; it will be replaced", path)
        return []
    files = data.get("files") if isinstance(data, dict) else None
    return [e for e in files if isinstance(e, dict) and "file" in e] if isinstance(files, list) else []


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_outputs(requests: list[Request], out_dir: Path, overwrite: bool) -> list[str]:
    """The file name of every request; UserError when two would collide or (without --overwrite) one exists."""
    names = output_names(requests)
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise UserError(f"Two samples would both be written to {name} (same prompt {requests[i].prompt!r} and "
                            f"seed {requests[i].seed}); give them different seeds (prompts file 'seed').")
        seen[name] = i
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise UserError(f"{len(existing)} output file(s) already exist in {out_dir}: {shown}. Nothing was generated. "
                        f"Pass --overwrite to replace them, or choose another --output_dir or --seed.")
    return names


def add_audio_prompt(model, info, path: str, requests: list[Request]) -> None:
    """Encode the audio prompt once and give it to every request (their durations include it)."""
    wav = load_audio(path, info.sample_rate, channels=info.audio_channels)
    prompt_seconds = wav.shape[-1] / info.sample_rate
    prompt_codes, prompt_id = generation.encode_audio_prompt(model, info, wav)
    log.info("Audio prompt %s: %.2f s (%d frames) is continued; durations include it", path, prompt_seconds,
             prompt_codes.shape[-1])
    for r in requests:
        if r.duration <= prompt_seconds:
            raise UserError(f"duration {r.duration:g} s does not reach past the audio prompt "
                            f"({prompt_seconds:.2f} s); the duration includes the prompt, so ask for more.")
        r.prompt_codes, r.prompt_id = prompt_codes, prompt_id


def check_melody_files(specs: list[PromptSpec], problems: list[str]) -> None:
    """Every melody file exists and is readable audio (before the model loads)."""
    for path in dict.fromkeys(s.melody for s in specs if s.melody):
        if not Path(path).is_file():
            problems.append(f"melody_audio file not found: {path}.")
            continue
        try:
            audio_info(path)
        except UserError as e:
            problems.append(f"melody_audio: {e}")


def add_melodies(info, specs: list[PromptSpec], requests: list[Request]) -> None:
    """Each request's melody (the chroma of its melody file, computed once per file); UserError when the model
    takes no melody or a file is silent."""
    wanted = {s.melody for s in specs if s.melody}
    if not wanted:
        return
    if not family_for(info).MELODY:
        raise UserError(f"--melody_audio (or a prompt's 'melody') needs a melody model such as "
                        f"facebook/musicgen-melody (or --model_path tiny-melody); {info.name_or_path} is a text-only "
                        f"MusicGen. Nothing was written.")
    melodies = {}
    for path in sorted(wanted):
        wav = load_audio(path, info.sample_rate, channels=1)
        try:
            chroma, mid = generation.melody_from_audio(wav, info)
        except UserError as e:
            raise UserError(f"melody_audio {path}: {e} Nothing was written.") from None
        melodies[path] = (chroma, mid, file_hash(path))
        log.info("Melody %s: %.2f s, %d chroma frames", path, wav.shape[-1] / info.sample_rate, chroma.shape[0])
    by_spec = [s for s in specs for _ in range(s.num_samples)]
    for spec, r in zip(by_spec, requests):
        if spec.melody:
            r.melody, r.melody_id, r.melody_sha1 = melodies[spec.melody]


def library_versions() -> dict:
    """The versions a sample's numbers depend on (recorded with every file of the manifest)."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


class ManifestWriter:
    """Writes each finished batch's WAVs and rewrites manifest.json (atomically) after every batch: entries of
    earlier runs for other files that still exist are kept."""

    def __init__(self, g: GenerationConfig, out_dir: Path, requests: list[Request], names: list[str], model, info,
                 adapter_info):
        self.g, self.out_dir, self.info, self.adapter_info = g, out_dir, info, adapter_info
        self.path = out_dir / MANIFEST
        self.name_of = {id(r): n for r, n in zip(requests, names)}
        self.kept = [e for e in _load_manifest(self.path) if e["file"] not in set(names)
                     and (out_dir / e["file"]).exists()]
        self.written: list[dict] = []
        self.subtype = "PCM_16" if g.output_format == "pcm16" else "FLOAT"
        self.model_entry = {"name_or_path": info.name_or_path, "identity": info.identity,
                            "hub_revision": info.hub_revision, "sample_rate": info.sample_rate,
                            "frame_rate": info.frame_rate, "num_codebooks": info.num_codebooks,
                            "audio_channels": info.audio_channels}
        decoder_param = family_for(info).decoder_param(model)
        self.versions = library_versions()
        self.common = {"device": decoder_param.device.type, "lora_scale": g.lora_scale if adapter_info else None,
                       "merge": adapter_info.get("merged") if adapter_info else None,
                       "dtype": str(decoder_param.dtype).replace("torch.", ""),
                       "max_window": g.max_window, "extend_stride": g.extend_stride,
                       "audio_prompt": str(Path(g.audio_prompt).resolve()) if g.audio_prompt else None,
                       "normalize": g.normalize, "output_format": g.output_format, "batch_size": g.batch_size}

    def write_batch(self, results) -> None:
        batch_files = [self.name_of[id(res.request)] for res in results]
        for res in results:
            self.written.append(self._write(res, self.name_of[id(res.request)], batch_files))
        atomic_write_json(self.path, {
            "about": "Files generated by lora/inference_lora.py. real_time_factor = generation seconds per second "
                     "of audio (below 1 is faster than real time). Regenerate a file with its prompt, seed and "
                     "settings (dtype, decoding, model, adapter) on the same device type and versions: on a CPU it "
                     "comes out token for token the same (tokens_sha1) alone or batched with other prompts; on a "
                     "GPU, generate it in the same batch (batch_files, in that order) for the same guarantee. "
                     "text_length is the padded length of the text states, which depends on the prompt alone.",
            "updated": _now(), "files": self.kept + self.written})

    def _write(self, res, name: str, batch_files: list) -> dict:
        r, audio, sr = res.request, res.audio, self.info.sample_rate
        peak = float(abs(audio).max()) if audio.size else 0.0
        if self.g.normalize:
            if peak > 0:
                audio = normalize_peak(audio, -1.0)
            else:
                log.warning("%s is silent (all zeros); written as is", name)
        elif peak > 1.0 and self.subtype == "PCM_16":
            log.warning("%s peaks at %+.1f dBFS and will clip in 16-bit PCM; use --normalize true or "
                        "--output_format float", name, peak_db(res.audio))
        save_wav(self.out_dir / name, audio, sr, subtype=self.subtype)
        seconds = audio.shape[-1] / sr
        return {
            "file": name, "prompt": r.prompt, "unconditional": not r.prompt, "seed": r.seed,
            "settings": {**generation.settings_dict(r), **self.common, "decoding": res.decoding},
            "model": self.model_entry, "adapter": self.adapter_info,
            "duration_s": round(seconds, 6), "channels": int(audio.shape[0]), "sample_rate": sr,
            "frames": int(res.codes.shape[-1]), "windows": len(res.windows),
            "tokens_sha1": hashlib.sha1(res.codes.numpy().astype("<i8").tobytes()).hexdigest(),
            "peak_dbfs_before_normalize": round(peak_db(res.audio), 2) if peak > 0 else None,
            "generation_time_s": round(res.generation_time, 4),
            "real_time_factor": round(res.generation_time / seconds, 4),
            "melody": ({"file": str(Path(r.melody_file).resolve()), "sha1": r.melody_sha1,
                        "chroma_id": r.melody_id} if r.melody_file else None),
            "batch_size": res.batch_size, "batch_files": batch_files, "text_length": res.text_length,
            "versions": self.versions, "created": _now()}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plan: dict = {}

    def rules(cfg, ns) -> list[str]:
        """Everything checked before anything loads, besides each value's range (the schema's): the prompts and
        their per-prompt settings, settings that depend on each other, the input files, the adapter."""
        g = cfg.generation
        problems: list[str] = []
        plan["specs"] = build_prompt_specs(g, problems)
        problems.append(temperature_problem(g.temperature, g.do_sample))
        if not g.extend_stride < g.max_window:
            problems.append(f"extend_stride ({g.extend_stride} s) must be > 0 and smaller than max_window "
                            f"({g.max_window} s); audiocraft uses 18 of 30.")
        check_melody_files(plan["specs"], problems)
        if g.audio_prompt and not Path(g.audio_prompt).is_file():
            problems.append(f"audio_prompt file not found: {g.audio_prompt}.")
        elif g.audio_prompt:
            try:
                audio_info(g.audio_prompt)  # readable audio, before the model loads
            except UserError as e:
                problems.append(f"audio_prompt: {e}")
        plan["adapters"], plan["default_adapter"] = choose_adapter(g, argv, problems)
        return [p for p in problems if p]

    cfg, _ = parse_config(argv, description=DESCRIPTION, sections=("generation", "model"), rules=rules)
    g, specs, adapters = cfg.generation, plan["specs"], plan["adapters"]
    log.info(describe_choice(cfg.model.model_path, adapters, adapter_scales(g, len(adapters)) if adapters else [],
                             plan["default_adapter"], f"nothing at the default lora_model_path {g.lora_model_path}"
                             if plan["default_adapter"] else ""))
    if not adapters and g.merge:
        log.info("merge: true has no effect without an adapter")
    requests = [Request(prompt=spec.text, seed=spec.seed + j, duration=spec.duration, sampling=spec.sampling,
                        melody_file=spec.melody or "") for spec in specs for j in range(spec.num_samples)]
    out_dir = check_output_dir(g.output_dir, "--output_dir")
    names = check_outputs(requests, out_dir, g.overwrite)
    log.info("Resolved settings: %s", json.dumps({"generation": dataclasses.asdict(g),
                                                  "model": dataclasses.asdict(cfg.model)}, default=str))
    log.info("%d prompt(s) x samples = %d file(s), %s of audio, into %s", len(specs), len(requests),
             human_seconds(sum(r.duration for r in requests)), out_dir)

    # ---- build
    import torch

    torch.manual_seed(g.seed)
    model, processor, info, adapter_info = generation.load_generation_model(cfg, adapter_path=adapters or None)
    if g.audio_prompt:
        add_audio_prompt(model, info, g.audio_prompt, requests)
    add_melodies(info, specs, requests)

    # ---- generate, writing each batch as it is ready
    bytes_per_sample = 2 if g.output_format == "pcm16" else 4
    check_free_space(out_dir, sum(r.duration for r in requests) * info.sample_rate * info.audio_channels
                     * bytes_per_sample * 1.05 + 2 ** 20, f"{len(requests)} WAV file(s)")
    writer = ManifestWriter(g, out_dir, requests, names, model, info, adapter_info)
    t0 = time.perf_counter()
    with on_interrupt(lambda: f"{len(writer.written)} of {len(requests)} file(s) were written to {out_dir} and are "
                              f"listed in {writer.path}; run the same command with other seeds or --overwrite for "
                              f"the rest"):
        results = generation.generate(model, processor, info, requests, batch_size=g.batch_size,
                                      max_window=g.max_window, extend_stride=g.extend_stride, progress=True,
                                      on_batch=writer.write_batch, decoding=g.decoding)
    wall = time.perf_counter() - t0
    cfg.save(out_dir / "inference_config.yaml")
    gen_time = sum(r.generation_time for r in results)
    audio_s = sum(r.audio.shape[-1] for r in results) / info.sample_rate
    rtf = gen_time / audio_s if audio_s else float("nan")
    print(f"Wrote {len(results)} file(s) to {out_dir} ({human_seconds(audio_s)} of audio in {human_seconds(wall)}); "
          f"real-time factor {rtf:.3f} ({1 / rtf if rtf else float('inf'):.2f}x real time). "
          f"Manifest: {writer.path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
