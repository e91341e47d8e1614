"""What a generation writes, the same for the CLI (inference_lora.py) and the web UI (app.py): the
file names, the requests' audio prompt and melodies, the WAVs and manifest.json (ManifestWriter)."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from lora.common.cli import UserError, log
from lora.common.files import atomic_write_json
from lora.config import GenerationConfig
from lora.dataprep.audio import audio_info, file_hash, load_audio, normalize_peak, peak_db, save_wav
from lora.dataprep.melody_stems import chroma_source, melody_separator
from lora.generation import engine
from lora.generation import requests as generation_requests
from lora.generation.requests import Request
from lora.modeling.loading import family_for

if TYPE_CHECKING:
    from torch import nn

    from lora.modeling.musicgen import ModelInfo

MANIFEST = "manifest.json"
SLUG_MAX_BYTES = 80


# --------------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------------
def slugify(text: str, max_bytes: int = SLUG_MAX_BYTES) -> str:
    """A file-name-safe slug: letters/digits of any script kept (lower-cased), everything else ->
    '-', at most ``max_bytes`` UTF-8 bytes. '' for a text without letters or digits."""
    s = unicodedata.normalize("NFKC", text).lower()
    s = re.sub(r"[^\w]+", "-", s, flags=re.UNICODE).replace("_", "-")
    s = re.sub(r"-{2,}", "-", s).strip("-")
    while len(s.encode("utf-8")) > max_bytes:
        s = s[:-1]
    return s.rstrip("-")


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:6]


def output_names(requests: list[Request]) -> list[str]:
    """``<slug>_s<seed>.wav`` per request (``<slug>_melody-<file stem>_s<seed>.wav`` with a melody);
    different prompts with the same slug get a hash suffix."""
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
# Inputs of the requests, writing
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
    """The file name of every request; UserError when two would collide or (without --overwrite) one
    exists."""
    names = output_names(requests)
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise UserError(f"Two samples would both be written to {name} (same prompt "
                            f"{requests[i].prompt!r} and seed {requests[i].seed}); give them "
                            f"different seeds (prompts file 'seed').")
        seen[name] = i
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5
                                           else "")
        raise UserError(f"{len(existing)} output file(s) already exist in {out_dir}: {shown}. "
                        f"Nothing was generated. Pass --overwrite to replace them, or choose "
                        f"another --output_dir or --seed.")
    return names


def add_audio_prompt(model: nn.Module, info: ModelInfo, path: str, requests: list[Request]) -> None:
    """Encode the audio prompt once and give it to every request (their durations include it)."""
    wav = load_audio(path, info.sample_rate, channels=info.audio_channels)
    prompt_seconds = wav.shape[-1] / info.sample_rate
    prompt_codes, prompt_id = engine.encode_audio_prompt(model, info, wav)
    log.info("Audio prompt %s: %.2f s (%d frames) is continued; durations include it", path,
             prompt_seconds, prompt_codes.shape[-1])
    for r in requests:
        if r.duration <= prompt_seconds:
            raise UserError(f"duration {r.duration:g} s does not reach past the audio prompt "
                            f"({prompt_seconds:.2f} s); the duration includes the prompt, so ask "
                            f"for more.")
        r.prompt_codes, r.prompt_id = prompt_codes, prompt_id


def check_melody_files(paths, problems: list[str], setting: str = "melody_audio") -> None:
    """Every melody file exists and is readable audio (before the model loads); ``setting`` names it
    in messages."""
    for path in dict.fromkeys(p for p in paths if p):
        if not Path(path).is_file():
            problems.append(f"{setting} file not found: {path}.")
            continue
        try:
            audio_info(path)
        except UserError as e:
            problems.append(f"{setting}: {e}")


def add_melodies(info: ModelInfo, requests: list[Request],
                 setting: str = "--melody_audio (or a prompt's 'melody')", model_cfg=None) -> None:
    """Each request's melody (the chroma of its ``melody_file``, computed once per file; from its
    vocals + other stems as ``model_cfg.melody_chroma`` says, lora.dataprep.melody_stems): ``melody``,
    ``melody_id``, ``melody_sha1``, ``melody_from``. UserError when the model takes no melody or a
    file is silent."""
    wanted = {r.melody_file for r in requests if r.melody_file}
    if not wanted:
        return
    if not family_for(info).MELODY:
        raise UserError(f"{setting} needs a melody model such as facebook/musicgen-melody (or "
                        f"--model_path tiny-melody); {info.name_or_path} is a text-only MusicGen. "
                        f"Nothing was written.")
    separator = melody_separator(model_cfg) if model_cfg is not None else None
    melodies = {}
    for path in sorted(wanted):
        wav = load_audio(path, info.sample_rate, channels=1 if separator is None else 2)
        try:
            chroma, mid = engine.melody_from_audio(wav, info, separator)
        except UserError as e:
            raise UserError(f"melody_audio {path}: {e} Nothing was written.") from None
        melodies[path] = (chroma, mid, file_hash(path))
        log.info("Melody %s: %.2f s, %d chroma frames", path, wav.shape[-1] / info.sample_rate,
                 chroma.shape[0])
    for r in requests:
        if r.melody_file:
            r.melody, r.melody_id, r.melody_sha1 = melodies[r.melody_file]
            r.melody_from = chroma_source(separator)


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
    """Writes each finished batch's WAVs and rewrites manifest.json (atomically) after every batch:
    entries of earlier runs for other files that still exist are kept."""

    def __init__(self, g: GenerationConfig, out_dir: Path, requests: list[Request],
                 names: list[str], model: nn.Module, info: ModelInfo, adapter_info):
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
        self.common = {"device": decoder_param.device.type, "lora_scale": g.lora_scale
                       if adapter_info else None,
                       "merge": adapter_info.get("merged") if adapter_info else None,
                       "dtype": str(decoder_param.dtype).replace("torch.", ""),
                       "max_window": g.max_window, "extend_stride": g.extend_stride,
                       "audio_prompt": str(Path(g.audio_prompt).resolve()) if g.audio_prompt else None,
                       "normalize": g.normalize, "output_format": g.output_format,
                       "batch_size": g.batch_size}

    def write_batch(self, results) -> None:
        batch_files = [self.name_of[id(res.request)] for res in results]
        for res in results:
            self.written.append(self._write(res, self.name_of[id(res.request)], batch_files))
        atomic_write_json(self.path, {
            "about": "Files generated by lora/inference_lora.py. real_time_factor = generation "
                     "seconds per second of audio (below 1 is faster than real time). Regenerate a "
                     "file with its prompt, seed and settings (dtype, decoding, model, adapter) on "
                     "the same device type and versions: on a CPU it comes out token for token the "
                     "same (tokens_sha1) alone or batched with other prompts; on a GPU, generate "
                     "it in the same batch (batch_files, in that order) for the same guarantee. "
                     "text_length is the padded length of the text states, which depends on the "
                     "prompt alone.",
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
            "settings": {**generation_requests.settings_dict(r), **self.common,
                         "decoding": res.decoding},
            "model": self.model_entry, "adapter": self.adapter_info,
            "duration_s": round(seconds, 6), "channels": int(audio.shape[0]), "sample_rate": sr,
            "frames": int(res.codes.shape[-1]), "windows": len(res.windows),
            "tokens_sha1": hashlib.sha1(res.codes.numpy().astype("<i8").tobytes()).hexdigest(),
            "peak_dbfs_before_normalize": round(peak_db(res.audio), 2) if peak > 0 else None,
            "generation_time_s": round(res.generation_time, 4),
            "real_time_factor": round(res.generation_time / seconds, 4),
            "melody": ({"file": str(Path(r.melody_file).resolve()), "sha1": r.melody_sha1,
                        "chroma_id": r.melody_id, "chroma_from": r.melody_from} if r.melody_file
                       else None),
            "batch_size": res.batch_size, "batch_files": batch_files, "text_length": res.text_length,
            "versions": self.versions, "created": _now()}
