"""Loading MusicGen (hub id | local folder | built-in tiny model), LoRA, and MusicGen's training targets.

Everything that touches the network goes through ``from_pretrained`` (so ``HF_ENDPOINT``, ``HF_HOME`` and
``HF_HUB_OFFLINE`` are honoured); a local folder and a hub id take the same code path. The built-in tiny
model (``model_path: tiny`` / ``tiny-stereo``) is a small random MusicGen built from config once, saved with
``save_pretrained`` and loaded back like any other folder, so every script runs without a download.

Shapes used throughout (K = number of codebooks, interleaved left/right for stereo models):
    codes            LongTensor (B, K, T)         EnCodec codes, T frames at ``info.frame_rate``
    decoder_input_ids LongTensor (B*K, T+Kc-1)    what MusicGen's decoder reads (Kc = codebooks per channel)
    labels           LongTensor (B, T+Kc-1, K)    delay-pattern targets, -100 where no loss is taken
    logits           FloatTensor (B*K, S, V)      as returned by ``MusicgenForConditionalGeneration``
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from lora.utils import UserError, atomic_dir, log

# Files a local MusicGen folder needs (see _check_local_dir).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
TINY_SEED = 1234
TINY_HEAD_STD = 0.3
TINY_FORMAT_VERSION = 4  # bump when the tiny architecture changes, so cached folders are rebuilt


# --------------------------------------------------------------------------------------------
# Model description
# --------------------------------------------------------------------------------------------
@dataclass
class ModelInfo:
    """What the rest of the toolkit needs to know about a loaded MusicGen."""

    name_or_path: str            # the real folder (absolute) or the hub id
    sample_rate: int             # Hz (32000 for MusicGen)
    frame_rate: int              # codec frames per second (50 for MusicGen)
    num_codebooks: int           # decoder codebooks, all channels (4 mono, 8 stereo)
    audio_channels: int          # 1 or 2
    pad_token_id: int            # decoder pad token (= codebook size for MusicGen)
    decoder_start_token_id: int  # first decoder input (BOS)
    vocab_size: int              # codebook size
    text_hidden_size: int        # T5 hidden size (before enc_to_dec_proj)
    identity: str                # stable short hash of config + weights (cache keys)
    model_type: str = "musicgen"
    hub_revision: Optional[str] = None  # commit of a hub snapshot, when known

    @property
    def codebooks_per_channel(self) -> int:
        return self.num_codebooks // self.audio_channels

    def frames(self, seconds: float) -> int:
        """Codec frames for ``seconds`` of audio."""
        import math

        return int(math.ceil(round(seconds * self.sample_rate) * self.frame_rate / self.sample_rate))

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# The built-in tiny model
# --------------------------------------------------------------------------------------------
_CAPTION_WORDS = """
drum drums loop loops kick kicks snare snares hihat hihats hat hats clap claps cymbal cymbals tom toms percussion
bass bassline sub chords chord arpeggio arpeggios synth synths synthesizer piano keys pad pads lead leads pluck
plucks guitar guitars acoustic electric strings violin cello orchestra orchestral brass horn horns trumpet sax
saxophone flute choir vocal vocals voice organ bell bells marimba harp
BPM bpm tempo key major minor C D E F G A B sharp flat # b
slow fast medium mid uptempo downtempo groove groovy swing straight shuffle rhythm rhythmic beat beats pattern
ambient techno house deep tech trance dubstep drum-and-bass dnb jungle garage trap hiphop hip hop lofi lo-fi jazz
jazzy blues rock pop funk funky soul disco reggae dub classical cinematic electronic edm experimental folk metal
punk indie latin afro world rnb r&b breakbeat breaks idm glitch minimal progressive synthwave chillout chill
happy sad dark bright calm energetic aggressive mellow dreamy epic melancholic uplifting relaxing emotional warm
cold moody atmospheric heavy soft loud gentle driving tense peaceful playful mysterious
music song track tune melody melodic harmony harmonic instrumental sound sounds sample samples one shot riff
solo intro outro verse chorus bridge drop build fill fills break section bar bars beat
with and a an the of in on for by to from at no without featuring feat over under plus
low high short long reverb delay distorted clean filtered sidechain analog digital vintage modern retro
layered simple complex sparse dense steady live studio recording recorded
0 1 2 3 4 5 6 7 8 9 10 11 12 16 24 32 4/4 3/4 6/8
""".split()


def _caption_vocabulary() -> list[str]:
    words = list(_CAPTION_WORDS)
    words += [str(n) for n in range(60, 181)]
    words += [f"{n}bpm" for n in range(60, 181, 10)]
    words += [f"{n} BPM" for n in range(60, 181, 5)]
    for note in "CDEFGAB":
        words += [f"{note}#", f"{note}b", f"{note} major", f"{note} minor", f"{note}# minor", f"{note}b major"]
    return words


def _build_tiny_tokenizer():
    """A small word-level tokenizer trained on a caption vocabulary, wrapped for transformers."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"], min_frequency=1)
    tok.train_from_iterator(_caption_vocabulary(), trainer=trainer)
    eos = tok.token_to_id("</s>")
    # Like T5: every text ends with </s>.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", eos)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                      model_max_length=512, padding_side="right")
    return wrapped


def _tiny_configs(stereo: bool, text_vocab: int):
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    codebook_size = 128  # = decoder vocab; special token (pad/bos) = 128 like 2048 for the real model
    channel_codebooks = 4
    # EnCodec like facebook/encodec_32khz: 32 kHz, hop 8*5*4*4 = 640 samples -> 50 Hz frames, not causal.
    # num_quantizers = 1000 * bandwidth // (frame_rate * log2(codebook_size)) = 1500 // 350 = 4.
    audio = EncodecConfig(
        sampling_rate=32000, audio_channels=1, upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[1.5],
        codebook_size=codebook_size, hidden_size=32, num_filters=4, num_residual_layers=1, num_lstm_layers=1,
        use_causal_conv=False, normalize=False, chunk_length_s=None, overlap=None, norm_type="weight_norm",
        pad_mode="reflect", compress=2, trim_right_ratio=1.0, use_conv_shortcut=False)
    text = T5Config(vocab_size=text_vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                    num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                    dropout_rate=0.1, feed_forward_proj="relu", pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0)
    decoder = MusicgenDecoderConfig(
        vocab_size=codebook_size, max_position_embeddings=2048, num_hidden_layers=2, ffn_dim=128,
        num_attention_heads=4, hidden_size=64, num_codebooks=channel_codebooks * (2 if stereo else 1),
        audio_channels=2 if stereo else 1, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
        activation_function="gelu", layerdrop=0.0, scale_embedding=False, tie_word_embeddings=False,
        pad_token_id=codebook_size, bos_token_id=codebook_size, decoder_start_token_id=codebook_size)
    cfg = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(), decoder=decoder.to_dict())
    return cfg


def _quiet_transformers():
    """Context: silence transformers' warnings while building the tiny model (special ids = vocab, as upstream)."""
    import contextlib

    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def cm():
        old = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(old)

    return cm()


def _tiny_is_complete(directory: Path, stereo: bool) -> bool:
    marker = directory / "tiny_model.json"
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if meta.get("version") != TINY_FORMAT_VERSION or meta.get("stereo") != stereo:
        return False
    return not _missing_local_files(directory)


def ensure_tiny_model(directory: str | os.PathLike, stereo: bool = False) -> Path:
    """Build the tiny random MusicGen into ``directory`` once (atomically); return the folder.

    Deterministic: the same code builds the same weights (seeded). An existing complete folder is reused.
    """
    directory = Path(directory).expanduser().resolve()
    if _tiny_is_complete(directory, stereo):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(directory.parent / f".{directory.name}.lock"):
        # Another process (e.g. a second GPU rank) may have built it while we waited.
        if _tiny_is_complete(directory, stereo):
            return directory
        _build_tiny_model(directory, stereo)
    return directory


def _file_lock(path: Path):
    """An exclusive inter-process lock (fcntl; a no-op where fcntl does not exist)."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        try:
            import fcntl
        except ImportError:  # Windows: building twice is harmless (atomic rename), only slower
            yield
            return
        with open(path, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    return cm()


def _synthetic_training_audio(n: int = 32, seconds: float = 1.0, sr: int = 32000):
    """Varied synthetic audio (tones, chords, noise bursts, clicks, sweeps at several levels) to fit codebooks."""
    import torch

    g = torch.Generator().manual_seed(TINY_SEED)
    t = torch.arange(int(seconds * sr)) / sr
    out = []
    for i in range(n):
        kind = i % 4
        f0 = float(55 * 2 ** (torch.rand(1, generator=g).item() * 5))
        if kind == 0:  # chord of sines
            x = sum(torch.sin(2 * torch.pi * f0 * r * t) for r in (1.0, 1.25, 1.5))
        elif kind == 1:  # saw-like bass with an envelope
            x = 2 * ((f0 * t) % 1.0) - 1
            x = x * torch.exp(-3 * (t % 0.5))
        elif kind == 2:  # noise bursts (drums)
            x = torch.randn(t.shape, generator=g) * torch.exp(-20 * (t % 0.25))
        else:  # sweep
            x = torch.sin(2 * torch.pi * (f0 + 400 * t) * t)
        level = 10 ** (-(torch.rand(1, generator=g).item() * 30) / 20)
        out.append(level * x / x.abs().max().clamp_min(1e-6))
    return torch.stack(out)[:, None, :]


def _fit_tiny_codebooks(audio_encoder, iters: int = 8) -> None:
    """Give the random EnCodec real codebooks: residual k-means on its own encoder latents of varied audio.

    A freshly initialised EncodecModel has all-zero codebooks, so every frame would get code 0 and nothing
    could be learned from the tiny model's tokens. Fitted codebooks make codes depend on the audio, as in
    a trained codec (the tiny model still sounds like noise: its decoder is random).
    """
    import torch

    g = torch.Generator().manual_seed(TINY_SEED)
    with torch.no_grad():
        latents = audio_encoder.encoder(_synthetic_training_audio())  # (B, D, T)
        residual = latents.permute(0, 2, 1).reshape(-1, latents.shape[1]).double()
        for layer in audio_encoder.quantizer.layers:
            book = layer.codebook
            k = book.codebook_size
            centroids = residual[torch.randperm(residual.shape[0], generator=g)[:k]].clone()
            for _ in range(iters):
                assign = torch.cdist(residual, centroids).argmin(dim=1)
                sums = torch.zeros_like(centroids).index_add_(0, assign, residual)
                counts = torch.bincount(assign, minlength=k)[:, None]
                centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
            assign = torch.cdist(residual, centroids).argmin(dim=1)
            book.embed.copy_(centroids.to(book.embed.dtype))
            book.embed_avg.copy_(centroids.to(book.embed.dtype))
            book.cluster_size.copy_(torch.bincount(assign, minlength=k).to(book.cluster_size.dtype))
            residual = residual - centroids[assign]


def _level_tiny_decoder(audio_encoder, target_rms: float = 0.1) -> None:
    """Random conv biases make the random EnCodec decoder output a constant DC offset (~0.06) whatever the codes,
    which every signal check rightly flags. Zero the decoder's biases and scale its last conv so decoded audio
    has no DC and a normal level (the tiny model still sounds like noise)."""
    import torch

    with torch.no_grad():
        for name, p in audio_encoder.decoder.named_parameters():
            if name.endswith("bias"):
                p.zero_()
        codes = torch.randint(0, audio_encoder.config.codebook_size, (1, 1, audio_encoder.quantizer.num_quantizers, 50),
                              generator=torch.Generator().manual_seed(TINY_SEED))
        rms = audio_encoder.decode(codes, [None]).audio_values.pow(2).mean().sqrt().item()
        g = audio_encoder.decoder.layers[-1].conv.parametrizations.weight.original0
        g.mul_(target_rms / max(rms, 1e-12))


def _build_tiny_model(directory: Path, stereo: bool) -> None:
    import torch
    from transformers import EncodecFeatureExtractor, GenerationConfig, MusicgenForConditionalGeneration, \
        MusicgenProcessor

    log.info("Building the tiny %s test model in %s (once)", "stereo" if stereo else "mono", directory)
    with _quiet_transformers():
        tokenizer = _build_tiny_tokenizer()
        cfg = _tiny_configs(stereo, text_vocab=len(tokenizer))
        fork_devices = []
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(TINY_SEED)
            model = MusicgenForConditionalGeneration(cfg)
            model.eval()
            _fit_tiny_codebooks(model.audio_encoder)
            _level_tiny_decoder(model.audio_encoder)
            with torch.no_grad():
                # Output heads with a larger init than transformers' std 0.02: a random LM whose logits span
                # only +-1 cannot be steered by attention adapters, so a short LoRA run could not show learning.
                for head in model.decoder.lm_heads:
                    head.weight.normal_(0.0, TINY_HEAD_STD)
        pad = cfg.decoder.pad_token_id
        model.generation_config = GenerationConfig(
            decoder_start_token_id=pad, pad_token_id=pad, bos_token_id=pad, guidance_scale=3.0, do_sample=True,
            max_length=1500, top_k=250)
        feature_extractor = EncodecFeatureExtractor(feature_size=1, sampling_rate=32000, padding_value=0.0,
                                                    chunk_length_s=None, overlap=None)
        processor = MusicgenProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
        with atomic_dir(directory) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            feature_extractor.save_pretrained(tmp)  # preprocessor_config.json, as in the hub folders
            (tmp / "tiny_model.json").write_text(json.dumps(
                {"version": TINY_FORMAT_VERSION, "stereo": stereo, "seed": TINY_SEED,
                 "note": "Built-in random MusicGen for tests and dry runs (lora.modeling.ensure_tiny_model)."},
                indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Resolving and loading
# --------------------------------------------------------------------------------------------
def resolve_model_path(model_cfg) -> str:
    """'tiny' / 'tiny-stereo' -> the built folder (built on first use); a folder -> its absolute path;
    anything else (a hub id) unchanged."""
    from lora.config import BUILTIN_MODELS

    path = str(model_cfg.model_path)
    if path in BUILTIN_MODELS:
        stereo = path == "tiny-stereo"
        base = Path(model_cfg.tiny_model_dir).expanduser()
        return str(ensure_tiny_model(base / ("stereo" if stereo else "mono"), stereo=stereo))
    p = Path(path).expanduser()
    if p.exists():
        return str(p.resolve())
    return path


def _looks_like_local_path(path: str) -> bool:
    """A hub id is exactly 'owner/name'; anything else (absolute, ./x, ~/x, a/b/c, C:\\x) is a folder."""
    return (os.path.isabs(path) or path.startswith((".", "~")) or "\\" in path or path.count("/") != 1)


def _missing_local_files(directory: Path) -> list[str]:
    missing = []
    if not (directory / "config.json").is_file():
        missing.append("config.json")
    if not any((directory / f).is_file() for f in WEIGHT_FILES):
        missing.append("model weights (model.safetensors, model.safetensors.index.json + shards, or "
                       "pytorch_model.bin)")
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json or spiece.model, plus tokenizer_config.json)")
    if not any((directory / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        missing.append("preprocessor_config.json (the EnCodec feature extractor settings)")
    return missing


def _download_hint(directory: str) -> str:
    return (f"Download a complete model folder, e.g. `huggingface-cli download facebook/musicgen-small "
            f"--local-dir {directory}` (set HF_ENDPOINT=https://your-mirror for a mirror), or pass a hub id "
            f"such as --model_path facebook/musicgen-small, or --model_path tiny for the built-in test model.")


def _check_model_type(config_path: Path, where: str) -> dict:
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{config_path} cannot be read as JSON ({e}). {_download_hint(where)}") from None
    model_type = cfg.get("model_type")
    if model_type == "musicgen_melody":
        raise UserError(
            f"{where} is a MusicGen-Melody model (model_type 'musicgen_melody'). Melody-conditioned models are not "
            f"supported yet: use a text-to-music model such as facebook/musicgen-small, -medium, -large or a "
            f"*-stereo-* variant.")
    if model_type != "musicgen":
        raise UserError(f"{where} is not a MusicGen model (config.json has model_type {model_type!r}, expected "
                        f"'musicgen'). Use facebook/musicgen-small|medium|large (or a stereo variant), a folder "
                        f"holding one, or 'tiny'.")
    return cfg


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _fetch_hub_config(model_id: str, revision: Optional[str], local_files_only: bool) -> Path:
    """Resolve config.json of a hub model (downloads only that small file); UserError if unreachable."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(model_id, "config.json", revision=revision, local_files_only=local_files_only))
    except Exception as e:  # huggingface_hub raises many types (offline, 404, auth, connection)
        offline = local_files_only or _offline()
        how = ("Offline mode is on (HF_HUB_OFFLINE=1 or local_files_only: true) and this model is not in the local "
               "cache (HF_HOME). " if offline else
               "The hub could not be reached or the model does not exist. ")
        raise UserError(
            f"Cannot load '{model_id}' from the Hugging Face hub: {type(e).__name__}: {str(e).splitlines()[0][:300]}\n"
            f"{how}Options: check the name (facebook/musicgen-small, facebook/musicgen-medium, "
            f"facebook/musicgen-large, facebook/musicgen-stereo-small, ...); use a mirror with "
            f"HF_ENDPOINT=https://your-mirror; download once with `huggingface-cli download {model_id} --local-dir "
            f"models/{model_id.split('/')[-1]}` and pass --model_path models/{model_id.split('/')[-1]}; or use "
            f"--model_path tiny to try the toolkit with the built-in test model. (No local folder "
            f"{Path(model_id).resolve()} exists either.)") from None


def _file_fingerprint(path: Path) -> str:
    """Content fingerprint of a (possibly huge) file: size + first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(size - (1 << 20))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def model_identity(directory: str | os.PathLike, extra: str = "") -> str:
    """Stable short hash of a model folder: config.json + content fingerprints of the weight files."""
    directory = Path(directory)
    h = hashlib.sha256(extra.encode())
    cfg = directory / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    names = sorted(p.name for p in directory.iterdir()
                   if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name in WEIGHT_FILES))
    for name in names:
        h.update(_file_fingerprint(directory / name).encode())
    return h.hexdigest()[:16]


def _load_with_attn(path: str, attn: str, **kw):
    """from_pretrained with the decoder's attention kernel set (EnCodec has no sdpa; it keeps its default)."""
    from transformers import MusicgenForConditionalGeneration

    if attn == "eager":
        return MusicgenForConditionalGeneration.from_pretrained(path, attn_implementation="eager", **kw)
    try:
        return MusicgenForConditionalGeneration.from_pretrained(path, attn_implementation={"decoder": attn}, **kw)
    except (ValueError, ImportError) as e:
        if "attn" not in str(e).lower() and "attention" not in str(e).lower():
            raise
        log.info("attn_implementation=%s is not available here (%s); falling back to eager attention", attn,
                 str(e).splitlines()[0][:200])
        return MusicgenForConditionalGeneration.from_pretrained(path, attn_implementation="eager", **kw)


class _SpecialTokenWarningFilter:
    """Drop transformers' "pad_token_id must be within the vocabulary" warning: MusicGen's decoder uses
    id = vocab_size (2048) as its pad/BOS token by design (its embeddings have vocab_size + 1 rows)."""

    def filter(self, record) -> bool:
        return "must be `None` or an integer within the vocabulary" not in record.getMessage()


def _install_warning_filter() -> None:
    import logging

    hf_log = logging.getLogger("transformers")
    if not any(isinstance(f, _SpecialTokenWarningFilter) for f in hf_log.filters):
        hf_log.addFilter(_SpecialTokenWarningFilter())
        for handler in hf_log.handlers:
            handler.addFilter(_SpecialTokenWarningFilter())


def load_base_model(model_cfg, device=None, dtype=None):
    """Load MusicGen + processor from a hub id, a local folder or the built-in tiny model.

    Returns (model, processor, info): the model is in eval mode with every parameter frozen.
    """
    from transformers import AutoProcessor

    _install_warning_filter()
    path = resolve_model_path(model_cfg)
    local_files_only = bool(getattr(model_cfg, "local_files_only", False)) or _offline()
    revision = getattr(model_cfg, "revision", None)
    kw: dict = {}
    hub_revision = None
    p = Path(path).expanduser()
    if p.is_dir():
        directory = p.resolve()
        path = str(directory)
        missing = _missing_local_files(directory)
        if (directory / "config.json").is_file():
            _check_model_type(directory / "config.json", path)
        if missing:
            raise UserError(f"The model folder {directory} is incomplete; missing: {'; '.join(missing)}. "
                            f"{_download_hint(str(directory))}")
        identity = model_identity(directory)
    elif p.exists():
        raise UserError(f"--model_path {path} is a file; it must be a model folder (with config.json, "
                        f"model.safetensors, tokenizer files, preprocessor_config.json) or a hub id.")
    elif _looks_like_local_path(path):
        raise UserError(f"Model folder not found: {path}. {_download_hint(path)}")
    else:
        config_file = _fetch_hub_config(path, revision, local_files_only)
        _check_model_type(config_file, path)
        snapshot = config_file.parent
        hub_revision = snapshot.name
        kw.update(revision=revision, local_files_only=local_files_only)
        directory = snapshot
        identity = None  # computed after the weights are present

    attn = getattr(model_cfg, "attn_implementation", "sdpa") or "sdpa"
    if dtype is not None:
        kw["dtype"] = dtype
    try:
        model = _load_with_attn(path, attn, **kw)
        processor = AutoProcessor.from_pretrained(path, **kw)
    except OSError as e:
        raise UserError(f"Could not load the model from {path}: {str(e).splitlines()[0][:400]}. "
                        f"{_download_hint(path if p.is_dir() else 'models/' + path.split('/')[-1])}") from None
    if identity is None:
        identity = model_identity(directory, extra=path)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    if device is not None:
        model.to(device)
    info = model_info(model, path, identity, hub_revision=hub_revision)
    log.info("Loaded %s: %d codebooks, %d channel(s), %d Hz, %.1fM parameters, dtype %s, attention %s",
             path, info.num_codebooks, info.audio_channels, info.sample_rate,
             sum(t.numel() for t in model.parameters()) / 1e6, next(model.parameters()).dtype,
             model.config.decoder._attn_implementation)
    return model, processor, info


def model_info(model, name_or_path: str, identity: str, hub_revision: Optional[str] = None) -> ModelInfo:
    base = get_base(model)
    cfg = base.config
    dec = cfg.decoder
    gen = getattr(base, "generation_config", None)
    start = getattr(gen, "decoder_start_token_id", None) if gen is not None else None
    if start is None:
        start = getattr(dec, "decoder_start_token_id", None)
    if start is None:
        start = dec.bos_token_id
    pad = getattr(gen, "pad_token_id", None) if gen is not None else None
    if pad is None:
        pad = dec.pad_token_id
    return ModelInfo(
        name_or_path=name_or_path, sample_rate=int(cfg.audio_encoder.sampling_rate),
        frame_rate=int(cfg.audio_encoder.frame_rate), num_codebooks=int(dec.num_codebooks),
        audio_channels=int(dec.audio_channels), pad_token_id=int(pad), decoder_start_token_id=int(start),
        vocab_size=int(dec.vocab_size), text_hidden_size=int(cfg.text_encoder.hidden_size), identity=identity,
        model_type=cfg.model_type, hub_revision=hub_revision)


def get_base(model):
    """The MusicgenForConditionalGeneration under a PeftModel (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


# --------------------------------------------------------------------------------------------
# Audio and text encoders
# --------------------------------------------------------------------------------------------
def _match_channels(wavs, channels: int):
    """(B, C, N) -> (B, channels, N): mix down for mono models, duplicate a mono signal for stereo models."""
    c = wavs.shape[1]
    if c == channels:
        return wavs
    if channels == 1:
        return wavs.mean(dim=1, keepdim=True)
    if c == 1:
        return wavs.expand(-1, channels, -1)
    raise ValueError(f"cannot map {c}-channel audio to a {channels}-channel model")


def encode_audio(model, wavs, info: ModelInfo):
    """EnCodec codes of float audio (B, C, N) at ``info.sample_rate`` -> LongTensor (B, K, T), T = ceil(N/hop).

    Stereo models: left and right are encoded separately and their codebooks interleaved (L0, R0, L1, R1, ...),
    exactly like MusicgenForConditionalGeneration does for audio prompts.
    """
    import torch

    codec = get_base(model).audio_encoder
    if wavs.dim() == 2:
        wavs = wavs[:, None, :]
    wavs = _match_channels(wavs, info.audio_channels)
    param = next(codec.parameters())
    wavs = wavs.to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        if info.audio_channels == 1:
            codes = codec.encode(wavs, return_dict=True).audio_codes[0]
        else:
            left = codec.encode(wavs[:, :1], return_dict=True).audio_codes[0]
            right = codec.encode(wavs[:, 1:], return_dict=True).audio_codes[0]
            b, k, t = left.shape
            codes = left.new_empty((b, 2 * k, t))
            codes[:, ::2] = left
            codes[:, 1::2] = right
    return codes.long()


def decode_audio(model, codes, info: ModelInfo):
    """Codes (B, K, T) -> float audio (B, C, N) with N = T * hop (as generate() decodes)."""
    import torch

    codec = get_base(model).audio_encoder
    codes = codes.to(next(codec.parameters()).device).long()
    scales = [None] * codes.shape[0]
    with torch.no_grad():
        if info.audio_channels == 1:
            return codec.decode(codes[None], audio_scales=scales).audio_values
        left = codec.decode(codes[None, :, ::2], audio_scales=scales).audio_values
        right = codec.decode(codes[None, :, 1::2], audio_scales=scales).audio_values
        return torch.cat([left, right], dim=1)


def encode_text(model, processor, texts: Sequence[str], device=None):
    """Frozen T5 states of the captions: (hidden (B, L, D) float, mask (B, L) long).

    ``hidden`` is the text encoder's last_hidden_state BEFORE ``enc_to_dec_proj`` (the model applies that
    itself). An empty caption ("") is the null condition: all-zero states and an all-zero mask, which is what
    generate() feeds the unconditional branch of classifier-free guidance.
    """
    import torch

    base = get_base(model)
    enc = base.text_encoder
    if device is None:
        device = next(enc.parameters()).device
    texts = [str(t) if t is not None else "" for t in texts]
    batch = processor.tokenizer(texts, padding=True, return_tensors="pt")
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device).long()
    trainable = any(p.requires_grad for p in enc.parameters())
    with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
        hidden = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    empty = torch.tensor([t.strip() == "" for t in texts], device=device)
    if bool(empty.any()):
        hidden = hidden.masked_fill(empty[:, None, None], 0.0)
        mask = mask.masked_fill(empty[:, None], 0)
    return hidden, mask


def null_condition(batch: int, info: ModelInfo, device=None, dtype=None):
    """The unconditional input: zeros (B, 1, D) states and zeros (B, 1) mask, as in
    MusicgenForConditionalGeneration.get_unconditional_inputs / the CFG branch of generate()."""
    import torch

    dtype = dtype or torch.float32
    hidden = torch.zeros((batch, 1, info.text_hidden_size), device=device, dtype=dtype)
    mask = torch.zeros((batch, 1), device=device, dtype=torch.long)
    return hidden, mask


# --------------------------------------------------------------------------------------------
# Training targets: MusicGen's delay pattern and the per-codebook loss
# --------------------------------------------------------------------------------------------
def build_delay_pattern(codes, lengths, info: ModelInfo):
    """Decoder inputs and labels for teacher forcing, with MusicGen's delay pattern.

    codes: LongTensor (B, K, T), right-padded; lengths: LongTensor (B,) valid frames per clip.
    Returns decoder_input_ids (B*K, S) and labels (B, S, K) with S = T + Kc - 1 (Kc = codebooks per channel).

    Codebook k (channel codebook c = k // 2 for stereo, whose codebooks interleave L/R) is delayed by c steps:
    labels[b, s, k] = codes[b, k, s - c] where 0 <= s - c < lengths[b], else -100. This is exactly what
    transformers' MusicgenForCausalLM.build_delay_pattern_mask + apply_delay_pattern_mask give on the codes with a
    BOS column prepended and max_length T + Kc, after dropping the BOS column (the special positions become -100),
    and it also masks each clip's batch padding. decoder_input_ids are the labels shifted right with the
    decoder start token first and the pad token wherever a label is -100 (transformers' shift_tokens_right),
    which is also what generate() feeds the decoder at the delay-pattern positions.
    """
    import torch

    if codes.dim() != 3:
        raise ValueError(f"codes must be (B, K, T), got shape {tuple(codes.shape)}")
    b, k, t = codes.shape
    if k != info.num_codebooks:
        raise ValueError(f"codes have {k} codebooks but the model uses {info.num_codebooks}")
    if t == 0:
        raise ValueError("codes have no frames (T = 0)")
    device = codes.device
    lengths = torch.as_tensor(lengths, device=device).long().clamp(0, t)
    kc = info.codebooks_per_channel
    s = t + kc - 1
    delay = torch.arange(k, device=device) // info.audio_channels if info.audio_channels == 2 else \
        torch.arange(k, device=device)
    pos = torch.arange(s, device=device)
    frame = pos[None, :] - delay[:, None]                                  # (K, S)
    valid = (frame[None] >= 0) & (frame[None] < lengths[:, None, None])    # (B, K, S)
    gathered = codes.long().gather(2, frame.clamp(0, t - 1)[None].expand(b, -1, -1))
    labels = torch.where(valid, gathered, torch.full_like(gathered, -100))  # (B, K, S)
    inputs = torch.full_like(labels, info.pad_token_id)
    inputs[..., 1:] = labels[..., :-1]
    inputs = inputs.masked_fill(inputs == -100, info.pad_token_id)
    inputs[..., 0] = info.decoder_start_token_id
    return inputs.reshape(b * k, s), labels.transpose(1, 2).contiguous()


def codebook_losses(logits, labels):
    """Per-codebook cross-entropy (as transformers / audiocraft): mean over tokens with label != -100 in each
    codebook, then the mean over codebooks.

    logits (B*K, S, V) as the model returns them; labels (B, S, K). Computed in float32 (safe under autocast).
    Returns (loss, per_codebook_loss (K,) detached, n_tokens (K,) long). A codebook without any valid token
    contributes 0.
    """
    import torch.nn.functional as F

    b, s, k = labels.shape
    v = logits.shape[-1]
    # One cross-entropy over all codebooks (B, K, s) in the logits' own layout: no per-codebook strided copies of
    # the logits, and one gradient tensor in backward instead of K zero-filled full-size ones.
    logits = logits.reshape(b, k, -1, v)
    if logits.shape[2] != s:  # (slicing the whole length would still cost a zero-filled gradient copy)
        logits = logits[:, :, -s:]
    logits = logits.float()
    ce = F.cross_entropy(logits.reshape(-1, v), labels.permute(0, 2, 1).reshape(-1), ignore_index=-100,
                         reduction="none").view(b, k, s)
    counts = (labels != -100).sum(dim=(0, 1))
    per_t = ce.sum(dim=(0, 2)) / counts.clamp(min=1)
    return per_t.mean(), per_t.detach(), counts.long()


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------
_ATTN_PROJ = r"(?:q_proj|k_proj|v_proj|out_proj)"
LORA_PRESETS = {
    # Decoder self- and cross-attention projections of every MusicgenDecoderLayer.
    "attention": rf"decoder\.model\.decoder\.layers\.\d+\.(?:self_attn|encoder_attn)\.{_ATTN_PROJ}",
    # ... plus the feed-forward block.
    "attention_ffn": rf"decoder\.model\.decoder\.layers\.\d+\.(?:(?:self_attn|encoder_attn)\.{_ATTN_PROJ}|fc1|fc2)",
}
# T5 encoder self-attention (train_text_encoder).
TEXT_ENCODER_TARGETS = r"text_encoder\.encoder\.block\.\d+\.layer\.0\.SelfAttention\.(?:q|k|v|o)"
_REGEX_CHARS = set("^$*+?[](){}|\\")


def _lora_capable(module) -> bool:
    import torch.nn as nn

    return isinstance(module, (nn.Linear, nn.Embedding))


def lora_target_names(model, targets: str, train_text_encoder: bool = False) -> list[str]:
    """Full module names that get LoRA for a ``lora_targets`` setting (a preset, suffixes or a regex).

    Only the MusicGen decoder is searched (plus the T5 self-attention when ``train_text_encoder``); EnCodec and
    the rest of T5 never get LoRA. A pattern that matches nothing is a UserError listing some module names.
    """
    base = get_base(model)
    modules = {name: mod for name, mod in base.named_modules() if name}
    decoder_names = [n for n in modules if n.startswith("decoder.") and _lora_capable(modules[n])]
    spec = (targets or "").strip()
    if not spec:
        raise UserError("lora_targets is empty; use 'attention', 'attention_ffn', a comma-separated list of module "
                        "name suffixes (e.g. q_proj,v_proj) or a regex.")
    if spec in LORA_PRESETS:
        rx = re.compile(LORA_PRESETS[spec])
        matched = [n for n in decoder_names if rx.fullmatch(n)]
    elif any(ch in _REGEX_CHARS for ch in spec):
        try:
            rx = re.compile(spec)
        except re.error as e:
            raise UserError(f"lora_targets {spec!r} is not a valid regular expression ({e}).") from None
        matched = [n for n in decoder_names if rx.search(n)]
    else:
        suffixes = [s.strip() for s in spec.split(",") if s.strip()]
        matched = [n for n in decoder_names if any(n == s or n.endswith("." + s) for s in suffixes)]
    if not matched:
        examples = [n for n in decoder_names if ".layers.0." in n][:12] or decoder_names[:12]
        raise UserError(
            f"lora_targets {spec!r} matches no layer of the MusicGen decoder. Use 'attention' (self+cross q/k/v/out), "
            f"'attention_ffn' (+ fc1/fc2), a comma-separated list of name suffixes or a regex. Some decoder layer "
            f"names: {', '.join(examples)}")
    if train_text_encoder:
        rx = re.compile(TEXT_ENCODER_TARGETS)
        text = [n for n, m in modules.items() if rx.fullmatch(n) and _lora_capable(m)]
        if not text:
            raise UserError("train_text_encoder: no T5 self-attention layers (q/k/v/o) found in the text encoder.")
        matched += text
    return sorted(set(matched), key=list(modules).index)


def attach_lora(model, lora_cfg):
    """Wrap the base model in a peft LoRA PeftModel following ``lora_cfg`` (a LoraSection).

    The adapter config records the real base (``model.name_or_path``: folder or hub id) as
    base_model_name_or_path, so ``PeftModel.from_pretrained(MusicgenForConditionalGeneration.from_pretrained(base),
    adapter_dir)`` loads the saved adapter.
    """
    from peft import LoraConfig, get_peft_model

    problems = []
    if int(lora_cfg.lora_rank) < 1:
        problems.append(f"lora_rank must be at least 1 (got {lora_cfg.lora_rank}); 8-32 is typical.")
    if float(lora_cfg.lora_alpha) <= 0:
        problems.append(f"lora_alpha must be positive (got {lora_cfg.lora_alpha}); usually 2x lora_rank.")
    if not 0.0 <= float(lora_cfg.lora_dropout) < 1.0:
        problems.append(f"lora_dropout must be in [0, 1) (got {lora_cfg.lora_dropout}).")
    if problems:
        raise UserError(" ".join(problems))
    base = get_base(model)
    names = lora_target_names(base, lora_cfg.lora_targets, bool(lora_cfg.train_text_encoder))
    base_name = getattr(base, "name_or_path", None) or base.config._name_or_path or None
    config = LoraConfig(
        r=int(lora_cfg.lora_rank), lora_alpha=float(lora_cfg.lora_alpha), lora_dropout=float(lora_cfg.lora_dropout),
        target_modules=names, bias="none", use_dora=bool(lora_cfg.use_dora), use_rslora=bool(lora_cfg.use_rslora),
        base_model_name_or_path=base_name)
    peft_model = get_peft_model(base, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    trainable, total = peft_model.get_nb_trainable_parameters()
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    log.info("LoRA (r=%d, alpha=%g%s%s) on %d modules (%s); trainable parameters %s of %s (%.3f%%)",
             config.r, config.lora_alpha, ", DoRA" if config.use_dora else "", ", rsLoRA" if config.use_rslora else "",
             len(names), shown, f"{trainable:,}", f"{total:,}", 100.0 * trainable / max(total, 1))
    return peft_model


def _same_base(recorded: str, used: str) -> bool:
    if recorded == used:
        return True
    pr, pu = Path(recorded).expanduser(), Path(used).expanduser()
    if pr.exists() and pu.exists():
        return os.path.realpath(pr) == os.path.realpath(pu)
    # A hub id and its snapshot in the HF cache (.../models--owner--name/snapshots/<commit>).
    for hub, path in ((recorded, used), (used, recorded)):
        if hub.count("/") == 1 and not Path(hub).exists():
            if f"models--{hub.replace('/', '--')}" in Path(path).as_posix():
                return True
    return False


def _same_model_name(recorded: str, used: str) -> bool:
    """facebook/musicgen-small vs a folder named musicgen-small (huggingface-cli download --local-dir)."""
    return Path(recorded.rstrip("/")).name.lower() == Path(used.rstrip("/")).name.lower()


def _adapter_shape_problems(base, adapter_file: Path) -> list[str]:
    """Compare the adapter's LoRA matrices with the model's layers (architecture check without loading)."""
    from safetensors import safe_open

    modules = dict(base.named_modules())
    problems = []
    with safe_open(str(adapter_file), framework="pt") as fh:
        for key in fh.keys():
            m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
            if not m:
                continue
            name, part = m.group(1), m.group(2)
            mod = modules.get(name)
            shape = tuple(fh.get_slice(key).get_shape())
            if mod is None:
                problems.append(f"layer {name} does not exist in this model")
            elif hasattr(mod, "in_features"):
                want = mod.in_features if part == "lora_A" else mod.out_features
                have = shape[1] if part == "lora_A" else shape[0]
                if want != have:
                    problems.append(f"{name}: adapter expects size {have}, model has {want}")
            if len(problems) >= 3:
                break
    return problems


_DECODER_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "num_codebooks",
                       "audio_channels", "vocab_size")


def _decoder_shape(decoder_cfg) -> dict:
    get = decoder_cfg.get if isinstance(decoder_cfg, dict) else (lambda k: getattr(decoder_cfg, k, None))
    return {k: get(k) for k in _DECODER_SHAPE_KEYS}


def _recorded_decoder_shape(recorded: str) -> Optional[dict]:
    """Decoder shape of the adapter's recorded base, when its config.json is on this machine."""
    cfg_file = Path(recorded).expanduser() / "config.json"
    if not cfg_file.is_file() and recorded.count("/") == 1:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(recorded, "config.json")
            cfg_file = Path(cached) if isinstance(cached, str) else cfg_file
        except (ImportError, ValueError):
            pass
    if not cfg_file.is_file():
        return None
    try:
        return _decoder_shape(json.loads(cfg_file.read_text(encoding="utf-8")).get("decoder") or {})
    except (OSError, ValueError):
        return None


def load_lora(model, adapter_dir, is_trainable: bool = False, expected_base: Optional[str] = None):
    """Load a saved PEFT LoRA adapter onto the base model; returns the PeftModel.

    Checks first (each failure is a UserError naming the file or both models): the folder holds
    adapter_config.json and adapter_model.safetensors; the adapter's base_model_name_or_path is the base in use
    (``expected_base``, default ``model.name_or_path``; same folder, same hub id, the hub id's cache snapshot, or
    a folder of the same model name); the adapter's layer sizes fit this model.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir).expanduser()
    if not adapter_dir.is_dir():
        raise UserError(f"LoRA adapter folder not found: {adapter_dir}. Train one with `python train_lora.py` "
                        f"(it writes output/best_model and output/final_model), or set lora_model_path to none to "
                        f"use the base model alone.")
    missing = [f for f in ("adapter_config.json", "adapter_model.safetensors") if not (adapter_dir / f).is_file()]
    if missing:
        raise UserError(f"{adapter_dir} is not a complete LoRA adapter: missing {', '.join(missing)}. Point "
                        f"lora_model_path at a folder written by train_lora.py (best_model, final_model or "
                        f"checkpoints/checkpoint-N).")
    try:
        adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{adapter_dir / 'adapter_config.json'} cannot be read ({e}).") from None
    base = get_base(model)
    used = str(expected_base or getattr(base, "name_or_path", "") or base.config._name_or_path or "")
    recorded = adapter_cfg.get("base_model_name_or_path") or ""
    shape_problems = _adapter_shape_problems(base, adapter_dir / "adapter_model.safetensors")
    if shape_problems:
        raise UserError(
            f"The LoRA adapter {adapter_dir} was trained on base model {recorded or '(not recorded)'} but the base "
            f"model in use is {used}, and their layers differ ({'; '.join(shape_problems)}). Use "
            f"--model_path {recorded or '<the base it was trained on>'}.")
    recorded_shape = _recorded_decoder_shape(recorded) if recorded else None
    used_shape = _decoder_shape(base.config.decoder)
    if recorded_shape is not None and recorded_shape != used_shape:
        diff = ", ".join(f"{k} {recorded_shape[k]} vs {used_shape[k]}" for k in _DECODER_SHAPE_KEYS
                         if recorded_shape[k] != used_shape[k])
        raise UserError(
            f"The LoRA adapter {adapter_dir} was trained on base model {recorded}, but the base model in use is "
            f"{used}, a different architecture ({diff}). Use --model_path {recorded}.")
    if recorded and used and not _same_base(recorded, used):
        if _same_model_name(recorded, used):
            log.warning("The adapter was trained on %s; using it with %s (same model name and layer sizes)",
                        recorded, used)
        else:
            raise UserError(
                f"The LoRA adapter {adapter_dir} was trained on base model {recorded}, but the base model in use is "
                f"{used}. Use --model_path {recorded}; if {used} really is a copy of that model, edit "
                f"base_model_name_or_path in {adapter_dir / 'adapter_config.json'}.")
    elif not recorded:
        log.warning("%s does not record its base model; assuming %s", adapter_dir / "adapter_config.json", used)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)
    if not is_trainable:
        peft_model.eval()
    log.info("Loaded LoRA adapter %s (r=%s) onto %s", adapter_dir, adapter_cfg.get("r"), used)
    return peft_model


def set_lora_scale(model, scale: float) -> None:
    """Scale the active adapter's update (0 = base model, 1 = full adapter)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.active_adapters:
                module.set_scale(name, float(scale))


def merge_lora(model):
    """Fold the LoRA update into the weights and return the plain MusicgenForConditionalGeneration."""
    return model.merge_and_unload()
