"""Vocal removal with demucs (MIT; the optional extra ``bash install.sh --separation``): the
separation model, loaded from demucs' Hugging Face hub layout, and one recording separated block by
block into its instrumental (every stem but vocals, summed).

The model. demucs 4.1 keeps its pretrained models on the hub (``htdemucs`` is the repository
``adefossez/HTDemucs``): ``<name>.yaml`` names the bag (``models``: one signature per model,
``weights``, ``segment``) and each ``<signature>.safetensors`` holds one model's tensors with its
class (``klass``), ``args`` and ``kwargs`` as JSON in the file's metadata. ``load_separator`` takes a
name (``htdemucs``, ``htdemucs_ft``, ``namespace/name``), resolved with ``hf_hub_download`` exactly
as ``demucs.hf.get_hf_model`` resolves it (so ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_OFFLINE`` and
``hf download adefossez/HTDemucs --local-dir X`` work as for MusicGen), or a local folder (or its
yaml file) in that layout; both then go through one path: demucs' own ``load_safetensors_model``
per signature and ``BagOfModels``. No pickle is read. Before loading, the class each file names is
checked against demucs' own model classes, so a weights file stays data only (demucs would import
and call whatever its metadata names).

Separating (``separate_file``) is what ``demucs.api.Separator.separate_tensor`` does, with
``shifts=0`` (deterministic: a cached result never depends on a random shift): the mix at the
model's rate, stereo (mono copied to both channels, as demucs does), normalised by the mean and
standard deviation of its mono sum, ``demucs.apply.apply_model`` with demucs' own segmenting and
overlap, then un-normalised. Memory stays bounded on long files: the recording is decoded twice
(once for the normalisation, once to separate) and separated in blocks of ``block_seconds`` whose
edges overlap by one model segment; a block's first and last segment are dropped, and because
every block starts on demucs' own segment grid, each kept sample is computed from exactly the
segments and weights ``apply_model`` uses on the whole file: the result equals demucs' whole-file
result (tests/dataprep/test_separation.py). The instrumental is mixed to the wanted channels,
resampled (soxr) to the wanted rate and written as a float WAV atomically; the vocal stem's level
per 1-second window is measured on the way (``VocalLevel``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from lora.common.cli import UserError
from lora.common.files import atomic_path, atomic_write_text
from lora.dataprep import audio as A

if TYPE_CHECKING:
    import torch

INSTALL_HINT = "bash install.sh --separation (or: pip install -r requirements-separation.txt)"
MIN_DEMUCS = (4, 1)
# demucs' own model classes: the only ones a weights file may name (demucs/apply.py: Model)
MODEL_CLASSES = ("demucs.htdemucs.HTDemucs", "demucs.hdemucs.HDemucs", "demucs.demucs.Demucs")
HUB_NAMESPACE = "adefossez"  # demucs.hf.DEFAULT_NAMESPACE
VOCALS = "vocals"
OVERLAP = 0.25  # demucs' default overlap of its segments
BLOCK_SECONDS = 120.0  # audio separated per block (plus one model segment on each side)
WINDOW_SECONDS = 1.0  # the vocal level is measured per window of this length
SILENT_WINDOW_DB = -50.0  # windows of the mix below this RMS level are not measured


def require_demucs():
    """The demucs package (4.1 or later), or a UserError that says how to install it."""
    try:
        import demucs.apply
        import demucs.hf  # noqa: F401  (the hub loader: 4.1 and later)
    except ImportError as e:
        raise UserError(f"Separating vocals needs demucs {'.'.join(map(str, MIN_DEMUCS))} or later, "
                        f"which is not installed ({e}): {INSTALL_HINT}.") from None
    from importlib.metadata import version

    v = version("demucs")
    if tuple(int(x) for x in v.split(".")[:2] if x.isdigit()) < MIN_DEMUCS:
        raise UserError(f"demucs {v} is installed; separation needs "
                        f"{'.'.join(map(str, MIN_DEMUCS))} or later (its models load from the hub "
                        f"as safetensors): {INSTALL_HINT}.")
    return demucs


# ============================================================================================
# The model: files, identity, loading
# ============================================================================================
def hub_repo(name: str) -> tuple[str, str]:
    """(repository id, bag name) of a demucs model name, as demucs.hf.get_hf_model maps it:
    htdemucs -> adefossez/HTDemucs, htdemucs_ft -> adefossez/HTDemucs-ft, mdx_extra ->
    adefossez/Demucs-mdx_extra; ``namespace/name`` uses that namespace."""
    namespace = HUB_NAMESPACE
    if "/" in name:
        namespace, name = name.split("/", 1)
    if name == "htdemucs":
        repo = "HTDemucs"
    elif name.startswith("htdemucs_"):
        repo = "HTDemucs-" + name[len("htdemucs_"):]
    else:
        repo = "Demucs-" + name
    return f"{namespace}/{repo}", name


@dataclass
class SeparatorFiles:
    """Where a separation model's files are: the bag's yaml and one safetensors file per model,
    with the identity (a hash of their bytes) that names its results in the cache."""

    spec: str            # what the user gave (name or folder)
    yaml_path: Path
    bag: dict            # the yaml: models, weights, segment
    weights: list[Path]
    identity: str = ""

    def __post_init__(self):
        if not self.identity:
            h = hashlib.sha256(self.yaml_path.read_bytes())
            for p in self.weights:
                h.update(A.file_hash(p).encode())
            self.identity = h.hexdigest()[:16]


def _read_bag(path: Path) -> dict:
    import yaml

    try:
        bag = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"separation model {path}: cannot read it ({str(e).splitlines()[0]}). "
                        f"It must be demucs' bag file (models, weights, segment).") from None
    models = bag.get("models") if isinstance(bag, dict) else None
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise UserError(f"separation model {path}: 'models' must list the signatures of the "
                        f"model files (<signature>.safetensors next to it).")
    return bag


def _local_files(folder: Path, spec: str) -> SeparatorFiles:
    """A folder in demucs' hub layout (or its yaml file)."""
    if folder.is_file():
        yaml_path = folder
    else:
        yamls = sorted(folder.glob("*.yaml"))
        if len(yamls) != 1:
            what = ", ".join(p.name for p in yamls) if yamls else "none"
            raise UserError(f"separation model {folder}: expected one bag file <name>.yaml in it "
                            f"(found {what}). Download a demucs model with: hf download "
                            f"adefossez/HTDemucs --local-dir {folder}; or pass the .yaml file itself.")
        yaml_path = yamls[0]
    bag = _read_bag(yaml_path)
    weights = [yaml_path.parent / f"{sig}.safetensors" for sig in bag["models"]]
    missing = [p.name for p in weights if not p.is_file()]
    if missing:
        raise UserError(f"separation model {yaml_path}: the model file(s) {', '.join(missing)} "
                        f"are missing next to it (demucs' hub layout: <name>.yaml and one "
                        f"<signature>.safetensors per model).")
    return SeparatorFiles(spec, yaml_path, bag, weights)


def _hub_files(name: str, local_files_only: bool) -> SeparatorFiles:
    """A demucs model name, through the hub cache (hf_hub_download, as demucs.hf.get_hf_model)."""
    from huggingface_hub import hf_hub_download

    repo_id, bag_name = hub_repo(name)
    try:
        yaml_path = Path(hf_hub_download(repo_id, f"{bag_name}.yaml", local_files_only=local_files_only))
        bag = _read_bag(yaml_path)
        weights = [Path(hf_hub_download(repo_id, f"{sig}.safetensors", local_files_only=local_files_only))
                   for sig in bag["models"]]
    except UserError:
        raise
    except Exception as e:  # hub errors: offline, not found, network  # noqa: BLE001
        raise UserError(f"separation model {name!r}: could not get it from the hub repository "
                        f"{repo_id} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). Offline, "
                        f"download it once where there is a connection (hf download {repo_id} "
                        f"--local-dir models/{bag_name}) and pass that folder "
                        f"(--separation_model models/{bag_name}); HF_ENDPOINT selects a mirror.") from None
    return SeparatorFiles(name, yaml_path, bag, weights)


def separator_files(spec: str, *, local_files_only: bool = False) -> SeparatorFiles:
    """The files of a separation model: a local folder (or yaml file) in demucs' hub layout, else a
    demucs model name on the hub."""
    p = Path(spec).expanduser()
    if p.exists():
        return _local_files(p, spec)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"separation model {spec}: no such folder. Give a demucs model name "
                        f"(htdemucs, htdemucs_ft) or a folder holding <name>.yaml and its "
                        f".safetensors files.")
    return _hub_files(spec, local_files_only)


def check_model_file(path: Path) -> None:
    """Refuse a weights file whose metadata names a class that is not one of demucs' models (or
    a state structure that would import anything but diffq's), before demucs imports it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"separation model file {path} is not a readable safetensors file "
                        f"({e}).") from None
    klass = meta.get("klass")
    if klass not in MODEL_CLASSES:
        raise UserError(f"separation model file {path} names the class {klass!r}, which is not "
                        f"one of demucs' models ({', '.join(MODEL_CLASSES)}); it is not loaded.")
    bad = [c for c in _classes(json.loads(meta.get("structure") or "null"))
           if not c.startswith("diffq.")]
    if bad:
        raise UserError(f"separation model file {path} would import {', '.join(bad)}; only "
                        f"demucs' models (and diffq's quantizer) are loaded.")
    for key in ("args", "kwargs"):
        try:
            json.loads(meta.get(key, ""))
        except ValueError:
            raise UserError(f"separation model file {path}: its '{key}' metadata is not JSON; "
                            f"not a demucs hub model file.") from None


def _classes(node) -> list[str]:
    """Every ``_class`` named in a demucs state structure (demucs.hf._unflatten_state)."""
    if isinstance(node, dict):
        out = [node["_class"]] if isinstance(node.get("_class"), str) else []
        return out + [c for v in node.values() for c in _classes(v)]
    if isinstance(node, list):
        return [c for v in node for c in _classes(v)]
    return []


@dataclass
class Separator:
    """A loaded separation model (demucs' BagOfModels) and how it cuts audio."""

    files: SeparatorFiles
    model: object
    device: "torch.device"
    samplerate: int = 0
    sources: list[str] = field(default_factory=list)
    segment: int = 0        # samples of the longest model segment
    stride: int = 0         # block starts are multiples of this (every model's segment stride)

    def __post_init__(self):
        m = self.model
        self.samplerate, self.sources = int(m.samplerate), list(m.sources)
        segs = [int(m2.samplerate * float(m2.segment)) for m2 in m.models]
        strides = [int((1 - OVERLAP) * s) for s in segs]
        self.segment, self.stride = max(segs), math.lcm(*strides)
        if VOCALS not in self.sources:
            raise UserError(f"separation model {self.files.spec} separates "
                            f"{', '.join(self.sources)}: it has no '{VOCALS}' stem to remove.")

    @property
    def keep(self) -> list[int]:
        """Indices of the stems the instrumental keeps (all but vocals)."""
        return [i for i, s in enumerate(self.sources) if s != VOCALS]


def pick_device(device: str) -> "torch.device":
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("data.separation_device cuda: no CUDA GPU is visible to torch; use auto or cpu.")
    return torch.device(device)


def load_separator(files: SeparatorFiles, device: str = "auto") -> Separator:
    """Instantiate the model: each file checked (``check_model_file``), then demucs' own loader."""
    require_demucs()
    from demucs.apply import BagOfModels
    from demucs.hf import load_safetensors_model

    for p in files.weights:
        check_model_file(p)
    models = [load_safetensors_model(p) for p in files.weights]
    bag = BagOfModels(models, files.bag.get("weights"), files.bag.get("segment"))
    bag.eval()
    return Separator(files, bag, pick_device(device))


# ============================================================================================
# Writing demucs' hub layout (random models for tests and benchmarks)
# ============================================================================================
def _encode_json(value):
    """demucs.hf._decode_json's inverse: fractions as {"_type": "fraction", ...}."""
    if isinstance(value, Fraction):
        return {"_type": "fraction", "numerator": value.numerator, "denominator": value.denominator}
    if isinstance(value, dict):
        return {k: _encode_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode_json(v) for v in value]
    return value


def save_hub_folder(models: list, folder: Path, name: str, weights=None, segment=None) -> Path:
    """Save demucs models (built with their @capture_init arguments) as demucs' hub layout:
    ``<name>.yaml`` and one ``<signature>.safetensors`` per model, with ``klass``, ``args`` and
    ``kwargs`` in its metadata (what ``demucs.hf.load_safetensors_model`` reads). Returns the
    folder."""
    import yaml
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    sigs = []
    for m in models:
        args, kwargs = m._init_args_kwargs
        meta = {"klass": f"{type(m).__module__}.{type(m).__name__}",
                "args": json.dumps(_encode_json(list(args))), "kwargs": json.dumps(_encode_json(kwargs))}
        state = {k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()}
        data = save(state, metadata=meta)
        sig = hashlib.sha256(data).hexdigest()[:8]
        with atomic_path(folder / f"{sig}.safetensors") as tmp:
            tmp.write_bytes(data)
        sigs.append(sig)
    bag = {"models": sigs, "weights": weights, "segment": segment}
    atomic_write_text(folder / f"{name}.yaml", yaml.safe_dump(bag, sort_keys=False))
    return folder


# htdemucs' architecture (demucs' HTDemucs defaults and these: 41.5 M parameters, as the released
# model); TINY is a small model of the same class for tests (1-second segments)
HTDEMUCS_KWARGS = dict(channels=48, depth=4, nfft=4096, bottom_channels=512, t_layers=5,
                       segment=Fraction(39, 5))
TINY_KWARGS = dict(channels=4, depth=4, nfft=4096, t_layers=1, t_heads=2, t_hidden_scale=1.0,
                   bottom_channels=0, dconv_comp=2, segment=1)
SOURCES = ["drums", "bass", "other", "vocals"]


RANDOM_OUTPUT_SCALE = 8.0  # random_separator's output layers (see there)


def random_separator(folder: Path, *, size: str = "tiny", seed: int = 0, name: str = "htdemucs",
                     mute_vocals: bool = False) -> Path:
    """A randomly initialised HTDemucs (``size`` "tiny" or "htdemucs": the released model's
    architecture) saved in demucs' hub layout. ``mute_vocals``: its vocal stem is silent (the last
    layers' vocal outputs are zero), so every recording reads as instrumental."""
    import torch

    require_demucs()
    from demucs.htdemucs import HTDemucs

    torch.manual_seed(seed)
    model = HTDemucs(sources=list(SOURCES), **(TINY_KWARGS if size == "tiny" else HTDEMUCS_KWARGS))
    # Not degenerate: at demucs' own initialisation the stems are mostly a DC offset (the tiny model's
    # instrumental of a -13 dBFS mix: -46 dBFS above 20 Hz, which prepare_data rightly drops as
    # inaudible); the output layers scaled up make every stem carry audible signal (-28 dBFS), as a
    # trained model's do.
    with torch.no_grad():
        for last in (model.decoder[-1], model.tdecoder[-1]):
            last.conv_tr.weight.mul_(RANDOM_OUTPUT_SCALE)
    if mute_vocals:
        _mute_source(model, SOURCES.index(VOCALS))
    return save_hub_folder([model], folder, name)


def _mute_source(model, index: int) -> None:
    """Zero the weights and biases of the output layers' channels of one source (frequency branch:
    complex-as-channels, 2 x audio_channels per source; time branch: audio_channels per source)."""
    import torch

    ch = model.audio_channels
    with torch.no_grad():
        for last, per in ((model.decoder[-1], 2 * ch), (model.tdecoder[-1], ch)):
            conv = last.conv_tr
            lo, hi = index * per, (index + 1) * per
            conv.weight[:, lo:hi] = 0
            if conv.bias is not None:
                conv.bias[lo:hi] = 0


# ============================================================================================
# Separating one recording, block by block
# ============================================================================================
def mix_stats(path: Path, samplerate: int) -> tuple[int, float, float]:
    """(samples, mean, std) of the recording's mono sum at the model's rate (decoded block by
    block): demucs normalises the mix by these (torch.std: unbiased; + 1e-8)."""
    n, s, ss = 0, 0.0, 0.0
    for block in A.iter_audio(path, samplerate, 2, counts=A.DecodeCounts()):
        ref = block.mean(axis=0, dtype=np.float64)
        n += ref.size
        s += float(ref.sum())
        ss += float(np.dot(ref, ref))
    if n < 2:
        return n, 0.0, 1e-8
    mean = s / n
    return n, mean, math.sqrt(max(ss - s * mean, 0.0) / (n - 1)) + 1e-8


def plan_blocks(n: int, segment: int, stride: int, keep: int) -> list[tuple[int, int, int, int]]:
    """(start, end, keep_from, keep_to) of each block: blocks start on the segment grid (multiples
    of ``stride``), reach one ``segment`` beyond what they keep on each side (but at the file's
    ends), and the kept parts tile [0, n)."""
    keep = max(keep, stride)
    blocks, b0, k0 = [], 0, 0
    while True:
        b1 = k0 + keep + segment
        if b1 >= n - segment:
            blocks.append((b0, n, k0, n))
            return blocks
        blocks.append((b0, b1, k0, b1 - segment))
        k0 = b1 - segment
        b0 = ((k0 - segment) // stride) * stride


class _Window:
    """The decoded mix at the model's rate, read forward in [start, end) pieces."""

    def __init__(self, path: Path, samplerate: int):
        self.blocks = A.iter_audio(path, samplerate, 2, counts=A.DecodeCounts())
        self.buf = np.zeros((2, 0), np.float32)
        self.start = 0  # sample index of buf[:, 0]

    def take(self, b0: int, b1: int) -> np.ndarray:
        if b0 > self.start:
            self.buf, self.start = self.buf[:, b0 - self.start:], b0
        parts = [self.buf]
        have = self.buf.shape[1]
        while self.start + have < b1:
            block = next(self.blocks, None)
            if block is None:
                break
            parts.append(block)
            have += block.shape[1]
        self.buf = np.concatenate(parts, axis=1) if len(parts) > 1 else self.buf
        return self.buf[:, :b1 - b0]


@dataclass
class VocalLevel:
    """Energy of the mix and of the vocal stem per window (at the model's rate), and what they say:
    ``level_db`` the vocal stem's level relative to the mix in the loud windows where it is
    loudest (90th percentile), ``energy_percent`` its share of the mix's energy overall."""

    window: int
    mix: np.ndarray = field(default_factory=lambda: np.zeros(0))
    vocals: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def add(self, start: int, mix: np.ndarray, vocals: np.ndarray) -> None:
        """Add the samples [start, start + n) of the mix and the vocal stem, (C, n) each."""
        idx = (start + np.arange(mix.shape[1])) // self.window
        for name, arr in (("mix", mix), ("vocals", vocals)):
            e = np.bincount(idx, weights=np.square(arr, dtype=np.float64).sum(axis=0))
            old = getattr(self, name)
            grown = np.zeros(max(old.size, e.size))
            grown[:old.size] += old
            grown[:e.size] += e
            setattr(self, name, grown)

    def summary(self) -> dict:
        mix, voc = self.mix, self.vocals
        loud = mix / (2 * self.window) > 10 ** (SILENT_WINDOW_DB / 10)
        total = float(mix.sum())
        percent = 100.0 * float(voc.sum()) / total if total > 0 else 0.0
        if not loud.any():
            return {"vocals_db": None, "vocal_energy_percent": round(percent, 3), "windows": 0}
        ratio = np.maximum(voc[loud], 1e-30) / mix[loud]
        level = float(10 * np.log10(np.percentile(ratio, 90)))
        return {"vocals_db": round(max(level, -200.0), 2), "vocal_energy_percent": round(percent, 3),
                "windows": int(loud.sum())}


def separate_file(sep: Separator, src: Path, out: Path, sample_rate: int, channels: int, *,
                  block_seconds: float = BLOCK_SECONDS,
                  on_progress: Optional[Callable[[float], None]] = None) -> dict:
    """Separate one recording: its instrumental (every stem but vocals, summed) at ``sample_rate``
    with ``channels`` channels, written to ``out`` (float WAV, atomically). Returns the vocal level
    (``VocalLevel.summary``) and the seconds separated. ``on_progress(seconds)`` is called as
    segments finish. AudioError when the file cannot be decoded."""
    import soundfile as sf
    import torch
    from demucs.apply import apply_model

    sr = sep.samplerate
    n, mean, std = mix_stats(src, sr)
    if n == 0:
        raise A.AudioError(f"{src}: the file holds no audio samples")
    window, level = _Window(src, sr), VocalLevel(int(WINDOW_SECONDS * sr))
    rs = A.StreamResampler(sr, sample_rate, channels)
    blocks = plan_blocks(n, sep.segment, sep.stride, int(block_seconds * sr))
    with atomic_path(out) as tmp, sf.SoundFile(str(tmp), "w", sample_rate, channels,
                                                subtype="FLOAT", format="WAV") as fh:
        for b0, b1, k0, k1 in blocks:
            mix = window.take(b0, b1)
            chunks = len(range(0, mix.shape[1], int((1 - OVERLAP) * sep.segment))) * len(sep.model.models)
            step = (k1 - k0) / sr / max(chunks, 1)
            x = torch.from_numpy((mix - np.float32(mean)) / np.float32(std))[None]
            stems = apply_model(sep.model, x, shifts=0, split=True, overlap=OVERLAP, device=sep.device,
                                callback=_callback(on_progress, step))[0]
            stems = (stems[..., k0 - b0:k1 - b0] * std + mean).numpy()
            instrumental = stems[sep.keep].sum(axis=0)
            level.add(k0, mix[:, k0 - b0:k1 - b0], stems[sep.sources.index(VOCALS)])
            y = rs(A.mix_channels(instrumental, channels), last=k1 == n)
            fh.write(np.ascontiguousarray(y.T))
    return dict(level.summary(), seconds=round(n / sr, 3))


def _callback(on_progress, step: float):
    if on_progress is None:
        return None

    def cb(d: dict) -> None:
        if d.get("state") == "end":
            on_progress(step)
    return cb
