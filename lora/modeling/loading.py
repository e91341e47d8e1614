"""Loading a base model: a hub id, a local folder or a built-in tiny model, and the model family it
belongs to.

Everything that touches the network goes through ``from_pretrained`` (so ``HF_ENDPOINT``,
``HF_HOME`` and ``HF_HUB_OFFLINE`` are honoured); a local folder and a hub id take the same code
path. The built-in tiny models (``model_path: tiny`` / ``tiny-stereo`` / ``tiny-melody`` /
``tiny-stereo-melody``, lora.modeling.tiny_model) are built from config once, saved with
``save_pretrained`` and loaded back like any other folder, so every script runs without a download.

The checkpoint's ``config.json`` names its ``model_type``; ``FAMILIES`` maps it to the module that
knows that family's internals (``lora.modeling.musicgen``, ``lora.modeling.musicgen_melody``).
``family_for(info or model)`` is how the rest of the toolkit reaches it, so a new family is one
sibling module and one line here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lora.common.cli import UserError, log
from lora.common.files import atomic_write_json, file_lock
from lora.config import BUILTIN_MODELS
from lora.modeling import musicgen, musicgen_melody
from lora.modeling.tiny_model import ensure_tiny_model

if TYPE_CHECKING:
    import torch

FAMILIES = {musicgen.MODEL_TYPE: musicgen, musicgen_melody.MODEL_TYPE: musicgen_melody}

# Files a local model folder needs (see missing_local_files).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def family_for(what):
    """The family module of a ModelInfo, a (PEFT-wrapped) model or a model_type string."""
    if isinstance(what, str):
        model_type = what
    elif hasattr(what, "model_type") and isinstance(what.model_type, str):
        model_type = what.model_type
    else:
        base = what.get_base_model() if hasattr(what, "get_base_model") else what
        model_type = base.config.model_type
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UserError(f"model_type {model_type!r} is not a model family this toolkit knows "
                        f"({', '.join(FAMILIES)}).") from None


# --------------------------------------------------------------------------------------------
# Resolving
# --------------------------------------------------------------------------------------------
def local_model_folder(model_cfg) -> Optional[Path]:
    """The folder a model setting reads on this machine, without building or loading anything: a
    built-in name -> its folder under tiny_model_dir (built or not), a folder -> its absolute path,
    a hub id -> None. (A model's folder is never an output: lora.common.ownership.)"""
    path = str(model_cfg.model_path)
    if path in BUILTIN_MODELS:
        name = ("stereo" if "stereo" in path else "mono") + ("-melody" if path.endswith("melody") else "")
        return (Path(model_cfg.tiny_model_dir).expanduser() / name).resolve()
    p = Path(path).expanduser()
    return p.resolve() if p.exists() else None


def resolve_model_path(model_cfg) -> str:
    """'tiny' / 'tiny-stereo' -> the built folder (built on first use); a folder -> its absolute
    path; anything else (a hub id) unchanged."""
    path = str(model_cfg.model_path)
    if path in BUILTIN_MODELS:
        stereo, melody = "stereo" in path, path.endswith("melody")
        return str(ensure_tiny_model(local_model_folder(model_cfg), stereo=stereo, melody=melody))
    p = Path(path).expanduser()
    if p.exists():
        return str(p.resolve())
    return path


def looks_like_local_path(path: str) -> bool:
    """A hub id is exactly 'owner/name'; anything else (absolute, ./x, ~/x, a/b/c, C:\\x) is a
    folder."""
    return (os.path.isabs(path) or path.startswith((".", "~")) or "\\" in path or path.count("/") != 1)


def missing_local_files(directory: Path) -> list[str]:
    """What a model folder lacks to be loaded (empty when it is complete)."""
    directory = Path(directory)
    missing = []
    if not (directory / "config.json").is_file():
        missing.append("config.json")
    if not any((directory / f).is_file() for f in WEIGHT_FILES):
        missing.append("model weights (model.safetensors, model.safetensors.index.json + shards, or "
                       "pytorch_model.bin)")
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json or spiece.model, plus tokenizer_config.json)")
    if not any((directory / f).is_file()
               for f in ("preprocessor_config.json", "processor_config.json")):
        missing.append("preprocessor_config.json (the EnCodec feature extractor settings)")
    return missing


def download_hint(directory: str) -> str:
    return (f"Download a complete model folder, e.g. `hf download facebook/musicgen-small "
            f"--local-dir {directory}` (set HF_ENDPOINT=https://your-mirror for a mirror), or pass "
            f"a hub id such as --model_path facebook/musicgen-small, or --model_path tiny for the "
            f"built-in test model.")


def check_model_type(config_path: Path, where: str) -> dict:
    """config.json of a model folder or hub snapshot; UserError unless its model_type is a family we
    know."""
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{config_path} cannot be read as JSON ({e}). {download_hint(where)}") from None
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(f"{where} is not a MusicGen model (config.json has model_type "
                        f"{model_type!r}, expected 'musicgen' or 'musicgen_melody'). Use "
                        f"facebook/musicgen-small|medium|large, facebook/musicgen-melody (or a "
                        f"stereo variant), a folder holding one, or 'tiny'.")
    return cfg


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _fetch_hub_config(model_id: str, revision: Optional[str], local_files_only: bool) -> Path:
    """Resolve config.json of a hub model (downloads only that small file); UserError if
    unreachable."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(model_id, "config.json", revision=revision,
                                    local_files_only=local_files_only))
    except Exception as e:  # huggingface_hub raises many types (offline, 404, auth, connection)
        offline = local_files_only or _offline()
        how = ("Offline mode is on (HF_HUB_OFFLINE=1 or local_files_only: true) and this model is "
               "not in the local cache (HF_HOME). " if offline else
               "The hub could not be reached or the model does not exist. ")
        raise UserError(
            f"Cannot load '{model_id}' from the Hugging Face hub: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]}\n{how}Options: check the name "
            f"(facebook/musicgen-small, facebook/musicgen-medium, facebook/musicgen-large, "
            f"facebook/musicgen-stereo-small, ...); use a mirror with "
            f"HF_ENDPOINT=https://your-mirror; download once with `hf download {model_id} "
            f"--local-dir models/{model_id.split('/')[-1]}` and pass --model_path "
            f"models/{model_id.split('/')[-1]}; or use --model_path tiny to try the toolkit with "
            f"the built-in test model. (No local folder {Path(model_id).resolve()} exists "
            f"either.)") from None


# --------------------------------------------------------------------------------------------
# Identity (the token cache key)
# --------------------------------------------------------------------------------------------
# Files of a model folder that its identity covers, where present, besides every weight file (``*.safetensors``,
# ``*.bin``, shards and their ``*.index.json``): what turns a caption into text states and audio into codes.
IDENTITY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "spiece.model",
                  "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json",
                  "processor_config.json")
# of the sidecar's format (and of the digest it stores: sha256 of the whole file)
HASH_CACHE_VERSION = 1
# the toolkit's folder in the per-user cache ($XDG_CACHE_HOME or ~/.cache)
HASH_CACHE_DIR = "musicgen-lora"
# a file modified this shortly before it was hashed is not remembered (see file_digests)
_RACY_NS = 2_000_000_000
_READ_CHUNK = 8 << 20


def identity_files(directory: str | os.PathLike) -> list[Path]:
    """The files of a model folder that ``model_identity`` hashes, sorted by name."""
    directory = Path(directory)
    return sorted(p for p in directory.iterdir() if p.is_file() and (
        p.name in IDENTITY_FILES or p.name in WEIGHT_FILES or p.suffix in (".safetensors", ".bin")
        or p.name.endswith(".index.json")))


def hash_file(path: str | os.PathLike) -> str:
    """sha256 of a file's whole content (read in 8-MiB blocks into one buffer: ~1-1.6 GB/s on one
    core)."""
    h = hashlib.sha256()
    buf = bytearray(_READ_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def hash_cache_path() -> Path:
    """The sidecar that remembers file digests: $XDG_CACHE_HOME (or
    ~/.cache)/musicgen-lora/file_hashes.json. It lives in the user's cache, not beside the model,
    because model folders may be read-only (the HF hub cache)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / HASH_CACHE_DIR / "file_hashes.json"


def _stat_key(st: os.stat_result) -> list[int]:
    """What says a file is unchanged: size, modification and status-change times (ns). A rewrite, a
    touch, a copy over it with preserved times (ctime) all change it; then the file is hashed
    again."""
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns)]


def _read_hash_cache(path: Path) -> dict:
    """{real path: {"stat": [...], "sha256": hex}} of the sidecar; {} when it is missing, from
    another format version, or damaged (then it is rebuilt, with a log line)."""
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
            raise ValueError("not a {'version', 'files'} object")
        if doc.get("version") != HASH_CACHE_VERSION:
            log.info("File-hash cache %s has format %r (expected %d); rebuilding it.", path,
                     doc.get("version"), HASH_CACHE_VERSION)
            return {}
        return {k: v for k, v in doc["files"].items() if isinstance(v, dict)
                and isinstance(v.get("sha256"), str)
                and isinstance(v.get("stat"), list)}
    except (OSError, ValueError) as e:  # (JSON and UTF-8 errors are ValueErrors)
        log.warning("File-hash cache %s is damaged (%s); rebuilding it (model files are hashed in "
                    "full once).", path, str(e)[:200])
        return {}


def _write_hash_cache(path: Path, files: dict) -> None:
    """Write the sidecar atomically, without the entries of files that no longer exist."""
    kept = {k: v for k, v in sorted(files.items()) if os.path.exists(k)}
    try:
        atomic_write_json(path, {"version": HASH_CACHE_VERSION, "files": kept})
    except OSError as e:
        log.warning("Could not write the file-hash cache %s (%s); model files will be hashed in "
                    "full again at the next start.", path, e.strerror or e)


def file_digests(paths: list[Path]) -> dict[Path, str]:
    """sha256 of each file's whole content, remembered in a per-user sidecar (``hash_cache_path``)
    keyed by the file's real path, size, mtime and ctime, so an unchanged file is never read again.
    Processes that start together (one per GPU) take turns through a lock: the first hashes, the
    others find its digests. A file modified less than 2 s before it was hashed is not remembered
    (it could change again within the same timestamp tick and keep its stat key), so the next start
    hashes it once more."""
    sidecar = hash_cache_path()
    out: dict[Path, str] = {}
    with contextlib.ExitStack() as stack:
        try:
            sidecar.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(file_lock(sidecar.with_name(sidecar.name + ".lock")))
            known, writable = _read_hash_cache(sidecar), True
        except OSError as e:
            log.warning("The file-hash cache folder %s is not usable (%s); model files are hashed "
                        "in full.", sidecar.parent, e.strerror or e)
            known, writable = {}, False
        changed = False
        for p in paths:
            real = os.path.realpath(p)
            st = os.stat(real)
            entry = known.get(real)
            if entry is not None and entry["stat"] == _stat_key(st):
                out[p] = entry["sha256"]
                continue
            if st.st_size >= 1 << 30:
                log.info("Hashing %s (%.1f GB) for the token cache key; remembered in %s for later "
                         "starts.", p, st.st_size / 1e9, sidecar)
            started = time.time_ns()
            out[p] = hash_file(real)
            if started - st.st_mtime_ns > _RACY_NS and _stat_key(os.stat(real)) == _stat_key(st):
                known[real] = {"stat": _stat_key(st), "sha256": out[p]}
                changed = True
        if changed and writable:
            _write_hash_cache(sidecar, known)
    return out


def model_identity(directory: str | os.PathLike, extra: str = "") -> str:
    """Stable short hash of a model folder (the token cache key): the whole content of its config,
    generation, tokenizer, processor and weight files (``identity_files``), each by name. Digests
    are remembered across starts (``file_digests``), so only the first start after a change reads
    the weights in full."""
    h = hashlib.sha256(extra.encode())
    for path, digest in file_digests(identity_files(directory)).items():
        h.update(f"{path.name}\0{digest}\n".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
class _SpecialTokenWarningFilter:
    """Drop transformers' "pad_token_id must be `None` or an integer within the vocabulary (between 0
    and 2047), got 2048" warning (three of them, pad/bos/decoder_start, at every load of a hub
    MusicGen): id = vocab_size is MusicGen's own convention for its pad/BOS token (its embeddings
    have vocab_size + 1 rows). Any other out-of-range id still warns."""

    PATTERN = re.compile(r"must be `None` or an integer within the vocabulary \(between 0 and (\d+)\), "
                         r"got (\d+)")

    def filter(self, record) -> bool:
        m = self.PATTERN.search(record.getMessage())
        return not (m and int(m.group(2)) == int(m.group(1)) + 1)


# transformers' loggers that give that warning (a filter on a parent logger does not see them)
_TOKEN_WARNING_LOGGERS = ("transformers.configuration_utils",
                          "transformers.models.musicgen.configuration_musicgen",
                          "transformers.models.musicgen_melody.configuration_musicgen_melody")


def _install_warning_filter() -> None:
    for name in _TOKEN_WARNING_LOGGERS:
        hf_log = logging.getLogger(name)
        if not any(isinstance(f, _SpecialTokenWarningFilter) for f in hf_log.filters):
            hf_log.addFilter(_SpecialTokenWarningFilter())


def _locate(path: str, model_cfg) -> tuple[str, Path, Optional[str], Optional[str], dict, str]:
    """Check a resolved model path before anything loads: (path, folder, identity or None (a hub
    snapshot: made after the weights are there), hub revision, from_pretrained kwargs,
    model_type)."""
    local_files_only = bool(getattr(model_cfg, "local_files_only", False)) or _offline()
    revision = getattr(model_cfg, "revision", None)
    p = Path(path).expanduser()
    if p.is_dir():
        directory = p.resolve()
        missing = missing_local_files(directory)
        model_type = None
        if (directory / "config.json").is_file():
            model_type = check_model_type(directory / "config.json", str(directory)).get("model_type")
        if missing:
            raise UserError(f"The model folder {directory} is incomplete; missing: "
                            f"{'; '.join(missing)}. {download_hint(str(directory))}")
        return str(directory), directory, model_identity(directory), None, {}, model_type
    if p.exists():
        raise UserError(f"--model_path {path} is a file; it must be a model folder (with config.json, "
                        f"model.safetensors, tokenizer files, preprocessor_config.json) or a hub id.")
    if looks_like_local_path(path):
        raise UserError(f"Model folder not found: {path}. {download_hint(path)}")
    config_file = _fetch_hub_config(path, revision, local_files_only)
    model_type = check_model_type(config_file, path).get("model_type")
    kw = {"revision": revision, "local_files_only": local_files_only}
    return path, config_file.parent, None, config_file.parent.name, kw, model_type


def load_base_model(model_cfg, device: torch.device | None = None, dtype=None):
    """Load a base model + processor from a hub id, a local folder or a built-in tiny model.

    Returns (model, processor, info): the model is in eval mode with every parameter frozen;
    ``info`` is the family's ModelInfo.
    """
    _install_warning_filter()
    path, directory, identity, hub_revision, kw, model_type = _locate(resolve_model_path(model_cfg),
                                                                      model_cfg)
    family = family_for(model_type)
    attn = getattr(model_cfg, "attn_implementation", "sdpa") or "sdpa"
    # float32 unless asked: a folder saved in half precision (export_model.py --dtype
    # float16/bfloat16) loads as float32 too (transformers' default reads the saved dtype), so
    # training, merging and casting start from the same weights whatever dtype they were stored in.
    kw["dtype"] = dtype if dtype is not None else "float32"
    try:
        model = family.from_pretrained(path, attn, **kw)
        processor = family.load_processor(path, **kw)
    except OSError as e:
        raise UserError(f"Could not load the model from {path}: {str(e).splitlines()[0][:400]}. "
                        f"{download_hint(path if Path(path).is_dir() else 'models/' + path.split('/')[-1])}"
                        ) from None
    if identity is None:
        identity = model_identity(directory, extra=path)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    if device is not None:
        model.to(device)
    info = family.model_info(model, path, identity, hub_revision=hub_revision)
    log.info("Loaded %s: %d codebooks, %d channel(s), %d Hz, %.1fM parameters, dtype %s, attention %s",
             path, info.num_codebooks, info.audio_channels, info.sample_rate,
             sum(t.numel() for t in model.parameters()) / 1e6, next(model.parameters()).dtype,
             family.attention_implementation(model))
    return model, processor, info
