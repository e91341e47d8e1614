"""The built-in tiny random models (``model_path: tiny`` / ``tiny-stereo``): for tests, the quick
start and dry runs.

A tiny model is a small random MusicGen built from config once (seeded: the same code builds the
same weights), saved with ``save_pretrained`` and then loaded back like any downloaded folder, so
every script runs with no download. It has a word-level caption tokenizer, an EnCodec whose
codebooks are fitted to varied synthetic audio (so codes depend on the audio, as in a trained codec)
and output heads with a larger init than transformers' (so a short LoRA run can show learning). It
still sounds like noise: its decoder is random.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lora.common.cli import log
from lora.common.files import atomic_dir, file_lock
from lora.modeling import musicgen, musicgen_melody

if TYPE_CHECKING:
    from torch import nn

TINY_SEED = 1234
TINY_HEAD_STD = 0.3
TINY_FORMAT_VERSION = 4  # bump when the tiny architecture changes, so cached folders are rebuilt
MARKER = "tiny_model.json"
# What _build_tiny_model writes that loading needs (its own completeness check).
TINY_FILES = ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json")


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
        words += [f"{note}#", f"{note}b", f"{note} major", f"{note} minor", f"{note}# minor",
                  f"{note}b major"]
    return words


def build_tokenizer():
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
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                      unk_token="<unk>", model_max_length=512, padding_side="right")
    return wrapped


def _tiny_configs(stereo: bool, text_vocab: int):
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    # = decoder vocab; special token (pad/bos) = 128 like 2048 for the real model
    codebook_size = 128
    channel_codebooks = 4
    # EnCodec like facebook/encodec_32khz: 32 kHz, hop 8*5*4*4 = 640 samples -> 50 Hz frames, not
    # causal. num_quantizers = 1000 * bandwidth // (frame_rate * log2(codebook_size)) = 1500 // 350
    # = 4.
    audio = EncodecConfig(
        sampling_rate=32000, audio_channels=1, upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[1.5],
        codebook_size=codebook_size, hidden_size=32, num_filters=4, num_residual_layers=1,
        num_lstm_layers=1,
        use_causal_conv=False, normalize=False, chunk_length_s=None, overlap=None,
        norm_type="weight_norm",
        pad_mode="reflect", compress=2, trim_right_ratio=1.0, use_conv_shortcut=False)
    text = T5Config(vocab_size=text_vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                    num_decoder_layers=2,
                    num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                    dropout_rate=0.1, feed_forward_proj="relu", pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0)
    decoder = MusicgenDecoderConfig(
        vocab_size=codebook_size, max_position_embeddings=2048, num_hidden_layers=2, ffn_dim=128,
        num_attention_heads=4, hidden_size=64, num_codebooks=channel_codebooks * (2 if stereo else 1),
        audio_channels=2 if stereo else 1, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
        activation_function="gelu", layerdrop=0.0, scale_embedding=False, tie_word_embeddings=False,
        pad_token_id=codebook_size, bos_token_id=codebook_size, decoder_start_token_id=codebook_size)
    cfg = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(),
                         decoder=decoder.to_dict())
    return cfg


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' warnings while building the tiny model (special ids = vocab, as
    upstream)."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def tiny_is_complete(directory: Path, stereo: bool, melody: bool = False) -> bool:
    """True when ``directory`` holds a finished tiny model of this format (mono or stereo, melody or
    not, as asked)."""
    marker = directory / MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if meta.get("version") != TINY_FORMAT_VERSION or meta.get("stereo") != stereo:
        return False
    if meta.get("melody", False) != (TINY_MELODY_VERSION if melody else False):
        return False
    return all((directory / f).is_file() for f in TINY_FILES)


def ensure_tiny_model(directory: str | os.PathLike, stereo: bool = False, melody: bool = False) -> Path:
    """Build the tiny random MusicGen (``melody``: MusicGen-Melody) into ``directory`` once
    (atomically); return the folder.

    Deterministic: the same code builds the same weights (seeded). An existing complete folder is
    reused.
    """
    directory = Path(directory).expanduser().resolve()
    if tiny_is_complete(directory, stereo, melody):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(directory.parent / f".{directory.name}.lock"):
        # Another process (e.g. a second GPU rank) may have built it while we waited.
        if tiny_is_complete(directory, stereo, melody):
            return directory
        (_build_tiny_melody_model if melody else _build_tiny_model)(directory, stereo)
    return directory


def _synthetic_training_audio(n: int = 32, seconds: float = 1.0, sr: int = 32000):
    """Varied synthetic audio (tones, chords, noise bursts, clicks, sweeps at several levels) to fit
    codebooks."""
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


def _fit_tiny_codebooks(codec, iters: int = 8) -> None:
    """Give the random EnCodec real codebooks: residual k-means on its own encoder latents of varied
    audio.

    A freshly initialised EncodecModel has all-zero codebooks, so every frame would get code 0 and
    nothing could be learned from the tiny model's tokens. Fitted codebooks make codes depend on the
    audio, as in a trained codec (the tiny model still sounds like noise: its decoder is random).
    """
    import torch

    g = torch.Generator().manual_seed(TINY_SEED)
    with torch.no_grad():
        latents = codec.encoder(_synthetic_training_audio())  # (B, D, T)
        residual = latents.permute(0, 2, 1).reshape(-1, latents.shape[1]).double()
        for layer in codec.quantizer.layers:
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


def _level_tiny_decoder(codec, target_rms: float = 0.1) -> None:
    """Random conv biases make the random EnCodec decoder output a constant DC offset (~0.06)
    whatever the codes, which every signal check rightly flags. Zero the decoder's biases and scale
    its last conv so decoded audio has no DC and a normal level (the tiny model still sounds like
    noise)."""
    import torch

    with torch.no_grad():
        for name, p in codec.decoder.named_parameters():
            if name.endswith("bias"):
                p.zero_()
        codes = torch.randint(0, codec.config.codebook_size, (1, 1, codec.quantizer.num_quantizers, 50),
                              generator=torch.Generator().manual_seed(TINY_SEED))
        rms = codec.decode(codes, [None]).audio_values.pow(2).mean().sqrt().item()
        g = codec.decoder.layers[-1].conv.parametrizations.weight.original0
        g.mul_(target_rms / max(rms, 1e-12))


def _random_tiny(model_class, cfg, family, extra=None):
    """The tiny model's weights, seeded (the same code builds the same weights): random, the codec's
    codebooks fitted and its decoder levelled, the output heads' init larger; ``extra(model)`` runs
    last under the same seed. With MusicGen's generation defaults (guidance 3, top-k 250,
    sampling)."""
    import torch
    from transformers import GenerationConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = model_class(cfg)
        model.eval()
        _fit_tiny_codebooks(family.audio_codec(model))
        _level_tiny_decoder(family.audio_codec(model))
        with torch.no_grad():
            # Output heads with a larger init than transformers' std 0.02: a random LM whose logits
            # span only +-1 cannot be steered by attention adapters, so a short LoRA run could not
            # show learning.
            for head in family.lm_heads(model):
                head.weight.normal_(0.0, TINY_HEAD_STD)
            if extra is not None:
                extra(model)
    pad = cfg.decoder.pad_token_id
    model.generation_config = GenerationConfig(
        decoder_start_token_id=pad, pad_token_id=pad, bos_token_id=pad, guidance_scale=3.0,
        do_sample=True, max_length=1500, top_k=250)
    return model


def _build_tiny_model(directory: Path, stereo: bool) -> None:
    from transformers import EncodecFeatureExtractor, MusicgenForConditionalGeneration, MusicgenProcessor

    log.info("Building the tiny %s test model in %s (once)", "stereo" if stereo else "mono", directory)
    with _quiet_transformers():
        tokenizer = build_tokenizer()
        cfg = _tiny_configs(stereo, text_vocab=len(tokenizer))
        model = _random_tiny(MusicgenForConditionalGeneration, cfg, musicgen)
        feature_extractor = EncodecFeatureExtractor(feature_size=1, sampling_rate=32000,
                                                    padding_value=0.0,
                                                    chunk_length_s=None, overlap=None)
        processor = MusicgenProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
        with atomic_dir(directory) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            # preprocessor_config.json, as in the hub folders
            feature_extractor.save_pretrained(tmp)
            (tmp / MARKER).write_text(json.dumps(
                {"version": TINY_FORMAT_VERSION, "stereo": stereo, "seed": TINY_SEED,
                 "note": "Built-in random MusicGen for tests and dry runs "
                         "(lora.tiny_model.ensure_tiny_model)."},
                indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# The tiny MusicGen-Melody
# --------------------------------------------------------------------------------------------
TINY_MELODY_VERSION = 3  # bump when the tiny melody model changes (its marker's "melody" holds it)
# init std of the melody and text projections (transformers': 0.02), see below
TINY_PREFIX_STD = 1.0
# spread of the norms' weights around 1 and of the biases around 0 (``make_nondegenerate``)
TINY_SPREAD_STD = 0.2
# the biases of the prefix's projections, in the units of their weights (TINY_PREFIX_STD)
TINY_PREFIX_BIAS_STD = 0.5
# as the released melody models: 30 s of chroma (shorter melodies are tiled to it)
TINY_CHROMA_LENGTH = 235
# facebook/musicgen-melody's preprocessor_config.json (the extractor needs torchaudio
MELODY_FEATURE_EXTRACTOR = {
    "feature_extractor_type": "MusicgenMelodyFeatureExtractor",
    "processor_class": "MusicgenMelodyProcessor",
    "feature_size": 12, "sampling_rate": 32000, "hop_length": 4096, "chunk_length": 30, "n_fft": 16384,
    "num_chroma": 12, "padding_value": 0.0, "padding_side": "right", "return_attention_mask": False,
    # to be built, so it is written as the hub folders have it; lora.chroma computes it)
    "stem_indices": [3, 2]}


def make_nondegenerate(model: nn.Module, generator=None) -> list[str]:
    """Give every norm weight (all ones at init) and every bias (all zeros at init) outside the
    codec a random value: norms 1 + N(0, TINY_SPREAD_STD), biases N(0, TINY_SPREAD_STD). With transformers'
    init, a bug that only a bias or a norm would show passes every test: a text mask applied before
    the projection instead of after it (the masked positions become the bias, not zero), a null
    melody of ``W[:, 0]`` without its bias, a norm skipped. Returns the names changed.

    The codec is skipped: its codebooks are fitted to its encoder's output and its decoder's biases
    are zero on purpose (``_level_tiny_decoder``: no DC offset). The text-only tiny models
    (``tiny``, ``tiny-stereo``) are not built with it: the quick start's held-out losses depend on
    their weights bit for bit, and their text states go through transformers' own projection and
    mask; tests apply it to a loaded copy where a bias matters (the static decoder's projection)."""
    import torch

    changed = []
    codec = {id(p) for p in musicgen.audio_codec(model).parameters()}  # (both families' codec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in codec or p.dim() != 1:
                continue
            noise = torch.randn(p.shape, generator=generator).to(p.dtype)
            if name.endswith("bias"):
                p.copy_(TINY_SPREAD_STD * noise)
            elif "norm" in name:
                p.copy_(1.0 + TINY_SPREAD_STD * noise)
            else:
                continue
            changed.append(name)
    return changed


def _large_prefix(model: nn.Module) -> None:
    """With transformers' init the prefix is ~0.02 in size and a random tiny decoder ignores it:
    greedy tokens would not depend on the melody, and no test could tell whether it reached the
    model. Every norm and bias is then made non-degenerate (``make_nondegenerate``), the
    projections' biases on the scale of their weights: the null melody is ``W[:, 0] + b`` and a
    masked text position is 0, not ``b``."""
    make_nondegenerate(model)
    for proj in musicgen_melody.decoder_modules(model)[1:]:
        proj.weight.normal_(0.0, TINY_PREFIX_STD)
        proj.bias.normal_(0.0, TINY_PREFIX_BIAS_STD)


def _build_tiny_melody_model(directory: Path, stereo: bool) -> None:
    from transformers import MusicgenMelodyForConditionalGeneration

    log.info("Building the tiny %s melody test model in %s (once)", "stereo" if stereo else "mono",
             directory)
    with _quiet_transformers():
        tokenizer = build_tokenizer()
        # T5 width 32 != decoder width 64: the text projection exists, as in the released models
        # (768 -> 1536)
        cfg = musicgen_melody.config_from_musicgen(_tiny_configs(stereo, text_vocab=len(tokenizer)),
                                                   chroma_length=TINY_CHROMA_LENGTH)
        model = _random_tiny(MusicgenMelodyForConditionalGeneration, cfg, musicgen_melody,
                             _large_prefix)
        with atomic_dir(directory) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "preprocessor_config.json").write_text(json.dumps(MELODY_FEATURE_EXTRACTOR,
                                                                     indent=2) + "\n",
                                                          encoding="utf-8")
            (tmp / MARKER).write_text(json.dumps(
                {"version": TINY_FORMAT_VERSION, "stereo": stereo, "melody": TINY_MELODY_VERSION,
                 "seed": TINY_SEED,
                 "note": "Built-in random MusicGen-Melody for tests "
                         "(lora.tiny_model.ensure_tiny_model)."},
                indent=2) + "\n", encoding="utf-8")
