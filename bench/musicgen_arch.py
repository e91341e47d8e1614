"""A random-weight MusicGen with facebook/musicgen-small's exact architecture, for benchmarks without a download.

    python bench/musicgen_arch.py [--dir /tmp/musicgen_small_arch]     # builds once (~590M parameters, 2.4 GB)

Architecture (from the hub configs of facebook/musicgen-small and facebook/encodec_32khz):
- text encoder: T5-base (d_model 768, d_kv 64, 12 layers, 12 heads, d_ff 3072, relu, vocab 32128);
- audio codec: EnCodec 32 kHz (hidden_size 128, num_filters 64, upsampling_ratios [8, 5, 4, 4] -> 50 Hz,
  codebook_size 2048, target_bandwidths [2.2] -> 4 codebooks, 2 LSTM layers, weight_norm, not causal);
- decoder: hidden 1024, 24 layers, 16 heads, ffn 4096, gelu, vocab 2048, 4 codebooks, 2048 positions.

Weights are random (seeded), so outputs are noise, but every matmul has the real size: speed and memory
measured on it are those of musicgen-small. The folder is written with save_pretrained (plus the tiny model's
word-level tokenizer standing in for T5's SentencePiece: it maps caption words to ids < 32128) and loaded
through lora.modeling.load_base_model, like a downloaded model.
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


def small_configs():
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    audio = EncodecConfig(
        sampling_rate=32000, audio_channels=1, target_bandwidths=[2.2], hidden_size=128, num_filters=64,
        num_residual_layers=1, upsampling_ratios=[8, 5, 4, 4], norm_type="weight_norm", kernel_size=7,
        last_kernel_size=7, residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=False, pad_mode="reflect",
        compress=2, num_lstm_layers=2, trim_right_ratio=1.0, codebook_size=2048, codebook_dim=128,
        use_conv_shortcut=False, normalize=False, chunk_length_s=None, overlap=None)
    text = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12,
                    num_heads=12, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    dropout_rate=0.1, feed_forward_proj="relu", layer_norm_epsilon=1e-6, pad_token_id=0,
                    eos_token_id=1, decoder_start_token_id=0)
    decoder = MusicgenDecoderConfig(
        vocab_size=2048, max_position_embeddings=2048, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
        hidden_size=1024, num_codebooks=4, audio_channels=1, dropout=0.1, attention_dropout=0.0,
        activation_dropout=0.0, activation_function="gelu", layerdrop=0.0, scale_embedding=False,
        tie_word_embeddings=False, pad_token_id=2048, bos_token_id=2048, decoder_start_token_id=2048)
    return MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(), decoder=decoder.to_dict())


def ensure_small_arch(directory: str | Path = DEFAULT_DIR) -> Path:
    """Build the random musicgen-small-architecture model into ``directory`` once; return the folder."""
    import torch
    from transformers import EncodecFeatureExtractor, GenerationConfig, MusicgenForConditionalGeneration, \
        MusicgenProcessor

    from lora.modeling import _build_tiny_tokenizer, _missing_local_files
    from lora.utils import atomic_dir

    directory = Path(directory).expanduser().resolve()
    marker = directory / "musicgen_arch.json"
    if marker.is_file() and json.loads(marker.read_text()).get("version") == VERSION \
            and not _missing_local_files(directory):
        return directory
    print(f"building the musicgen-small-architecture random model in {directory} (once) ...", file=sys.stderr)
    cfg = small_configs()
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(cfg).eval()
    pad = cfg.decoder.pad_token_id
    model.generation_config = GenerationConfig(decoder_start_token_id=pad, pad_token_id=pad, bos_token_id=pad,
                                               guidance_scale=3.0, do_sample=True, max_length=1500, top_k=250)
    fe = EncodecFeatureExtractor(feature_size=1, sampling_rate=32000, padding_value=0.0, chunk_length_s=None,
                                 overlap=None)
    processor = MusicgenProcessor(feature_extractor=fe, tokenizer=_build_tiny_tokenizer())
    directory.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        fe.save_pretrained(tmp)
        (tmp / "musicgen_arch.json").write_text(json.dumps(
            {"version": VERSION, "note": "random weights, facebook/musicgen-small architecture (bench/musicgen_arch.py)",
             "parameters": sum(p.numel() for p in model.parameters())}, indent=1))
    return directory


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=str(DEFAULT_DIR))
    d = ensure_small_arch(ap.parse_args().dir)
    print(d)
