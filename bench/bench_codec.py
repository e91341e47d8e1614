"""The token cache's EnCodec encoding: speed of the build before/after lora.modeling.encodec_fast,
and how well codes made in lower precision agree with float32 codes, per codebook.

    python bench/bench_codec.py                       # musicgen-small architecture (bench/musicgen_arch.py)
    python bench/bench_codec.py --quick               # tiny model, few clips: checks that the benchmark runs
    python bench/bench_codec.py --json bench/results/codec.json [--real_dir /usr/share/games/colobot/music]

1. **Cache build** (lora.dataprep.token_cache.build_token_cache, codes + caption states, as
   train_lora.py builds it) of 40 synthetic 10-s clips (the peer bench's amount of audio), from
   scratch, alternating in one process: "transformers" (EncodecModel.encode on each equal-length
   batch), "chunked, every layer" (lora.modeling.encodec_fast with every layer before the LSTM in
   time chunks: the code of 2026-12-01) and "chunked" (the code now: the last stage on the whole
   clip). Median per variant, median of the per-round ratios, and how many codes differ from
   "chunked".
2. **Agreement with float32 codes**, per codebook, of: the chunked fp32 encoder; transformers' fp32
   encoder at batch 8 (fp32 against itself at another batch size: the floor); the encoder in bf16
   (weights and activations, the quantizer in fp32); the whole encode under bf16 autocast (the
   quantizer's distances too). Reference: transformers' fp32 encode, one clip at a time. Codecs: the
   tiny model's (codebooks fitted to synthetic audio) and musicgen-small's architecture (random
   weights: its codebooks are fitted here, residual k-means on its own latents, so that codes depend
   on the audio as in a trained codec). Audio: synthetic clips, and real music recordings where
   --real_dir has some (Debian's colobot-common-sounds: produced game music, 44.1 kHz; any folder of
   audio files works). Real EnCodec weights cannot be downloaded here: that check stays open
   (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_cache import make_long_set  # noqa: E402
from machine import describe, save_json  # noqa: E402

REAL_DIR = "/usr/share/games/colobot/music"
# synthetic 4-s clips the codebooks are fitted on: 9,600 latent frames for 2,048 codes
FIT_CLIPS = 48


CACHE_VARIANTS = ("transformers", "chunked, every layer", "chunked")


def _encoder_variant(variant: str):
    """(supported, whole_clip_from) of lora.modeling.encodec_fast for a cache-build variant:
    transformers' EncodecModel.encode ("transformers"), every layer before the LSTM in chunks (the
    code of 2026-12-01), or the code now."""
    from lora.modeling import encodec_fast

    supported, whole = encodec_fast.supported, encodec_fast.whole_clip_from
    if variant == "transformers":
        return (lambda codec: False), whole
    if variant == "chunked, every layer":
        return supported, (lambda encoder: len(encodec_fast.stack_layers(encoder)))
    return supported, whole


def cache_build_ab(loaded, data_dir: Path, rounds: int) -> dict:
    import torch

    from lora import dataset
    from lora.dataprep import token_cache
    from lora.modeling import encodec_fast

    model, processor, info = loaded
    records = dataset.load_metadata(data_dir)
    saved = encodec_fast.supported, encodec_fast.whole_clip_from
    times: dict[str, list[float]] = {v: [] for v in CACHE_VARIANTS}
    codes = {}
    for r in range(rounds):
        # each variant first once in 3 rounds
        for variant in CACHE_VARIANTS[r % 3:] + CACHE_VARIANTS[:r % 3]:
            shutil.rmtree(token_cache.cache_root(data_dir, info), ignore_errors=True)
            encodec_fast.supported, encodec_fast.whole_clip_from = _encoder_variant(variant)
            try:
                t = time.perf_counter()
                clips, _ = token_cache.build_token_cache(records, model, processor, info, data_dir,
                                                         show_progress=False)
                times[variant].append(time.perf_counter() - t)
            finally:
                encodec_fast.supported, encodec_fast.whole_clip_from = saved
            codes[variant] = torch.stack([c.codes for c in clips])
    out = {"clips": len(records), "audio_s": sum(r.duration for r in records), "rounds": rounds}
    for v in CACHE_VARIANTS:
        out[f"{v} s"] = times[v]
        out[f"{v} s median"] = statistics.median(times[v])
        out[f"speed-up of chunked over {v} (median of per-round ratios)"] = statistics.median(
            x / y for x, y in zip(times[v], times["chunked"]))
        out[f"codes agree with {v}, per "
            f"codebook"] = (codes[v] == codes["chunked"]).float().mean(dim=(0, 2)).tolist()
    return out


def fit_codebooks(codec, audio, iters: int = 8) -> None:
    """Residual k-means of the codec's own latents of ``audio`` (B, 1, N) into its codebooks."""
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lat = codec.encoder(audio)
        res = lat.permute(0, 2, 1).reshape(-1, lat.shape[1]).double()
        for layer in codec.quantizer.layers:
            book = layer.codebook
            k = book.codebook_size
            if res.shape[0] < k:
                raise SystemExit(f"{res.shape[0]} latent frames cannot fit {k} codes: give more audio")
            c = res[torch.randperm(res.shape[0], generator=g)[:k]].clone()
            for _ in range(iters):
                assign = torch.cdist(res, c).argmin(1)
                sums = torch.zeros_like(c).index_add_(0, assign, res)
                n = torch.bincount(assign, minlength=k)[:, None]
                c = torch.where(n > 0, sums / n.clamp_min(1), c)
            assign = torch.cdist(res, c).argmin(1)
            book.embed.copy_(c.to(book.embed.dtype))
            book.embed_avg.copy_(c.to(book.embed.dtype))
            res = res - c[assign]


def variant_codes(codec, x, variant: str):
    import copy

    import torch

    from lora.modeling import encodec_fast

    out = []
    with torch.no_grad():
        if variant == "fp32 transformers b8":
            return torch.cat([codec.encode(x[i:i + 8]).audio_codes[0] for i in range(0, len(x), 8)])
        if variant == "fp32 chunked (ours) b8":
            return torch.cat([encodec_fast.encode_codes(codec, x[i:i + 8]) for i in range(0, len(x), 8)])
        if variant == "bf16 encoder":
            enc = copy.deepcopy(codec.encoder).to(torch.bfloat16)
            for i in range(len(x)):
                lat = enc(x[i:i + 1].to(torch.bfloat16)).float()
                out.append(codec.quantizer.encode(lat, codec.config.target_bandwidths[0]).transpose(0, 1))
            return torch.cat(out)
        if variant == "bf16 autocast":
            for i in range(len(x)):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out.append(codec.encode(x[i:i + 1]).audio_codes[0])
            return torch.cat(out)
    raise ValueError(variant)


VARIANTS = ("fp32 chunked (ours) b8", "fp32 transformers b8", "bf16 encoder", "bf16 autocast")


def agreement(codec, sets: dict) -> list[dict]:
    import torch

    rows = []
    for name, x in sets.items():
        with torch.no_grad():
            t = time.perf_counter()
            ref = torch.cat([codec.encode(x[i:i + 1]).audio_codes[0] for i in range(len(x))])
            ref_s = time.perf_counter() - t
        for v in VARIANTS:
            t = time.perf_counter()
            c = variant_codes(codec, x, v)
            s = time.perf_counter() - t
            rows.append({"audio": name, "clips": len(x), "variant": v, "seconds": s,
                         "reference_seconds": ref_s,
                         "agree_per_codebook": (c == ref).float().mean(dim=(0, 2)).tolist(),
                         "distinct_codes_cb0": int(ref[:, 0].unique().numel())})
    return rows


def audio_sets(real_dir: str | None, clips: int, seconds: float, sr: int) -> tuple[dict, object]:
    """({name: (B, 1, N) test audio}, fitting audio): synthetic clips, and real recordings' excerpts
    (test excerpts and fitting excerpts from different places of the tracks)."""
    import numpy as np
    import torch

    from lora.dataprep.audio import load_audio
    from lora.dataprep.example_data import STYLES, synth_clip

    rng = np.random.default_rng(0)
    styles = list(STYLES)
    syn = torch.from_numpy(np.stack([synth_clip(styles[i % len(styles)], seconds, sr, 1, rng)[0]
                                     for i in range(clips)]))
    fit = [torch.from_numpy(np.stack([synth_clip(styles[i % len(styles)], 4.0, sr, 1, rng)[0]
                                      for i in range(FIT_CLIPS)]))]
    sets = {"synthetic": syn}
    files = sorted(p for p in Path(real_dir).glob("*")
                   if p.suffix.lower() in (".ogg", ".wav", ".flac", ".mp3")) \
        if real_dir and Path(real_dir).is_dir() else []
    n = int(seconds * sr)
    real, fit_real = [], []
    for _i, f in enumerate(files):
        y = load_audio(f, sr, 1)
        if y.shape[1] >= int(20 * sr) + n and len(real) < clips:
            real.append(y[:, int(20 * sr):int(20 * sr) + n])
        elif y.shape[1] >= int(9 * sr):
            fit_real.append(y[:, int(5 * sr):int(9 * sr)])
    if real:
        sets["real music"] = torch.from_numpy(np.stack(real))
    if fit_real:
        fit.append(torch.from_numpy(np.stack(fit_real[:16])))
    return sets, torch.cat(fit)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="small (default; quick: tiny), medium, large, or a folder")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None,
                    help="cache builds per variant (default 3; quick 1)")
    ap.add_argument("--clips", type=int, default=None,
                    help="clips of the cache-build set (default 40; quick 4)")
    ap.add_argument("--agreement_clips", type=int, default=None,
                    help="clips per agreement set (default 12)")
    ap.add_argument("--real_dir", default=REAL_DIR,
                    help="a folder of real recordings (skipped when absent)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import logging

    import torch
    from musicgen_arch import model_path

    from lora.common.cli import setup_logging
    from lora.config import ModelConfig
    from lora.modeling.loading import family_for, load_base_model

    setup_logging(logging.WARNING)
    name = a.model or ("tiny" if a.quick else "small")
    rounds, clips = a.rounds or (1 if a.quick else 3), a.clips or (4 if a.quick else 40)
    m = describe()
    out = {"machine": m, "model": name, "command": "python bench/bench_codec.py " + " ".join(
        argv if argv is not None else sys.argv[1:])}
    with tempfile.TemporaryDirectory(prefix="bench_codec_") as tmp:
        tmp = Path(tmp)
        loaded = load_base_model(ModelConfig(model_path=model_path(name),
                                             tiny_model_dir=str(tmp / "tiny")))
        make_long_set(tmp / "set", 0, [10.0] * clips, loaded[2].sample_rate)
        out["cache_build"] = cache_build_ab(loaded, tmp / "set", rounds)
        tiny_model, _, tiny_info = load_base_model(ModelConfig(model_path="tiny",
                                                               tiny_model_dir=str(tmp / "tiny")))
        tiny = family_for(tiny_info).audio_codec(tiny_model)
        sets, fit_audio = audio_sets(a.real_dir, a.agreement_clips or (2 if a.quick else 12), 10.0, 32000)
        out["agreement"] = {"tiny (fitted)": agreement(tiny.eval(), sets)}
        if name != "tiny":
            codec = family_for(loaded[2]).audio_codec(loaded[0]).eval()
            fit_codebooks(codec, fit_audio)
            out["agreement"][f"{name} architecture (codebooks fitted)"] = agreement(codec, sets)
    cb = out["cache_build"]
    print(f"Token cache build | {m['cpu']}, {m['cores']} cores, torch {torch.__version__} | "
          f"{m['date']} | `{out['command'].strip()}`\n")
    print(f"{cb['clips']} clips, {cb['audio_s']:.0f} s of audio, {name}, medians of {rounds} builds:\n")
    print("| variant | build s | chunked's speed-up | codes agree with chunked, per codebook (%) |\n"
          "|---|---:|---:|---|")
    for v in CACHE_VARIANTS:
        agree = " / ".join(f"{100 * x:.2f}" for x in cb[f"codes agree with {v}, per codebook"])
        print(f"| {v} | {cb[f'{v} s median']:.1f} | "
              f"{cb[f'speed-up of chunked over {v} (median of per-round ratios)']:.2f}x | {agree} |")
    print()
    print("| codec | audio | variant | agreement with fp32 per codebook (%) | s | fp32 b1 s "
          "|\n|---|---|---|---|---:|---:|")
    for codec_name, rows in out["agreement"].items():
        for r in rows:
            print(f"| {codec_name} | {r['audio']} ({r['clips']} x 10 s, {r['distinct_codes_cb0']} "
                  f"distinct cb0 codes) | {r['variant']} | "
                  f"{' / '.join(f'{100 * v:.2f}' for v in r['agree_per_codebook'])} | "
                  f"{r['seconds']:.1f} | {r['reference_seconds']:.1f} |")
    if a.json:
        save_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
