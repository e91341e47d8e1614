"""Random-weight MusicGens with facebook/musicgen-small/-medium/-large's exact architectures, for
benchmarks without a download.

    python bench/musicgen_arch.py [--scale small] [--dir /tmp/musicgen_small_arch]   # builds once
    # small ~590M parameters (2.4 GB), medium ~1.8B (7 GB), large ~3.4B (14 GB), saved in float32 like the hub's;
    # --scale melody: facebook/musicgen-melody's architecture (medium's decoder, the melody prefix)

Architecture (from the hub configs of facebook/musicgen-{small,medium,large} and
facebook/encodec_32khz):
- text encoder (all three): T5-base (d_model 768, d_kv 64, 12 layers, 12 heads, d_ff 3072, relu,
  vocab 32128);
- audio codec (all three): EnCodec 32 kHz (hidden_size 128, num_filters 64, upsampling_ratios [8, 5,
  4, 4] -> 50 Hz, codebook_size 2048, target_bandwidths [2.2] -> 4 codebooks, 2 LSTM layers,
  weight_norm, not causal);
- decoder: gelu, vocab 2048, 4 codebooks, 2048 positions; small hidden 1024, 24 layers, 16 heads,
  ffn 4096; medium 1536, 48 layers, 24 heads, ffn 6144; large 2048, 48 layers, 32 heads, ffn 8192.

Weights are random (seeded), so outputs are noise, but every matmul has the real size: speed and
memory measured on it are those of musicgen-small. The folder is written with save_pretrained (plus
the tiny model's word-level tokenizer standing in for T5's SentencePiece: it maps caption words to
ids < 32128) and loaded through lora.modeling.loading.load_base_model, like a downloaded model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_DIR = Path("/tmp/musicgen_small_arch")
VERSION = 1
# decoder (hidden_size, num_hidden_layers, num_attention_heads, ffn_dim) of
# facebook/musicgen-<scale>
SCALES = {"small": (1024, 24, 16, 4096), "medium": (1536, 48, 24, 6144), "large": (2048, 48, 32, 8192),
          # facebook/musicgen-melody: medium's decoder, conditioned by a prefix
          "melody": (1536, 48, 24, 6144)}


def arch_dir(scale: str) -> Path:
    return DEFAULT_DIR if scale == "small" else Path(f"/tmp/musicgen_{scale}_arch")


def small_configs(scale: str = "small"):
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    audio = EncodecConfig(
        sampling_rate=32000, audio_channels=1, target_bandwidths=[2.2], hidden_size=128, num_filters=64,
        num_residual_layers=1, upsampling_ratios=[8, 5, 4, 4], norm_type="weight_norm", kernel_size=7,
        last_kernel_size=7, residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=False,
        pad_mode="reflect",
        compress=2, num_lstm_layers=2, trim_right_ratio=1.0, codebook_size=2048, codebook_dim=128,
        use_conv_shortcut=False, normalize=False, chunk_length_s=None, overlap=None)
    text = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                    num_decoder_layers=12,
                    num_heads=12, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    dropout_rate=0.1, feed_forward_proj="relu", layer_norm_epsilon=1e-6, pad_token_id=0,
                    eos_token_id=1, decoder_start_token_id=0)
    hidden, layers, heads, ffn = SCALES[scale]
    decoder = MusicgenDecoderConfig(
        vocab_size=2048, max_position_embeddings=2048, num_hidden_layers=layers, ffn_dim=ffn,
        num_attention_heads=heads, hidden_size=hidden, num_codebooks=4, audio_channels=1,
        dropout=0.1, attention_dropout=0.0,
        activation_dropout=0.0, activation_function="gelu", layerdrop=0.0, scale_embedding=False,
        tie_word_embeddings=False, pad_token_id=2048, bos_token_id=2048, decoder_start_token_id=2048)
    return MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(),
                          decoder=decoder.to_dict())


def ensure_small_arch(directory: str | Path = DEFAULT_DIR) -> Path:
    """Build the random musicgen-small-architecture model into ``directory`` once; return the
    folder."""
    return ensure_arch("small", directory)


def model_path(name: str) -> str:
    """The --model_path for a benchmark model name: tiny, small/medium/large (random weights with
    that hub model's architecture, built once under /tmp), or anything else as given (a hub id or
    folder)."""
    if name in SCALES:
        return str(ensure_arch(name))
    return name


def ensure_arch(scale: str = "small", directory: str | Path | None = None) -> Path:
    """Build the random musicgen-<scale>-architecture model into ``directory`` once; return the
    folder. The weights are initialised on a CUDA GPU when there is one (seconds instead of minutes
    for large)."""
    import torch
    from transformers import (
        EncodecFeatureExtractor,
        GenerationConfig,
        MusicgenForConditionalGeneration,
        MusicgenProcessor,
    )

    from lora.common.files import atomic_dir
    from lora.modeling.loading import missing_local_files
    from lora.modeling.tiny_model import build_tokenizer

    directory = Path(directory or arch_dir(scale)).expanduser().resolve()
    marker = directory / "musicgen_arch.json"
    if marker.is_file() and json.loads(marker.read_text()).get("version") == VERSION \
            and not missing_local_files(directory):
        return directory
    print(f"building the musicgen-{scale}-architecture random model in {directory} (once) ...",
          file=sys.stderr)
    cfg = small_configs(scale)
    model_class = MusicgenForConditionalGeneration
    # musicgen-melody: chroma prefix of 235 frames + the projected text, no cross-attention
    if scale == "melody":
        from transformers import MusicgenMelodyForConditionalGeneration

        from lora.modeling.musicgen_melody import config_from_musicgen

        cfg, model_class = config_from_musicgen(cfg,
                                                chroma_length=235), MusicgenMelodyForConditionalGeneration
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = model_class(cfg).eval()
    pad = cfg.decoder.pad_token_id
    model.generation_config = GenerationConfig(decoder_start_token_id=pad, pad_token_id=pad,
                                               bos_token_id=pad,
                                               guidance_scale=3.0, do_sample=True, max_length=1500,
                                               top_k=250)
    fe = EncodecFeatureExtractor(feature_size=1, sampling_rate=32000, padding_value=0.0,
                                 chunk_length_s=None, overlap=None)
    processor = MusicgenProcessor(feature_extractor=fe, tokenizer=build_tokenizer())
    directory.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        fe.save_pretrained(tmp)
        # the melody models' extractor settings (lora.modeling.chroma computes the features)
        if scale == "melody":
            from lora.modeling.tiny_model import MELODY_FEATURE_EXTRACTOR

            (tmp / "preprocessor_config.json").write_text(json.dumps(MELODY_FEATURE_EXTRACTOR, indent=2))
        (tmp / "musicgen_arch.json").write_text(json.dumps(
            {"version": VERSION, "scale": scale,
             "note": f"random weights, facebook/musicgen-{scale} architecture (bench/musicgen_arch.py)",
             "parameters": sum(p.numel() for p in model.parameters())}, indent=1))
    return directory


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="small", choices=sorted(SCALES))
    ap.add_argument("--dir", default=None, help="default /tmp/musicgen_<scale>_arch")
    a = ap.parse_args()
    d = ensure_arch(a.scale, a.dir)
    print(d)
