"""The generated-audio half of the evaluation: both models generate the same prompts and seeds;
signal checks, FAD/KAD against the held-out audio with their noise and codec floors, diversity,
melody adherence, CLAP, and the paired bootstrap intervals of the differences.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from lora.common.cli import UserError, log
from lora.config import Config
from lora.dataprep.audio import load_audio, save_wav
from lora.dataprep.melody_stems import chroma_source, melody_separator
from lora.generation.engine import generate_audio, melody_from_audio
from lora.generation.model import cast_for_generation
from lora.generation.requests import GenerationError
from lora.modeling import chroma as melody_chroma
from lora.modeling.clap import load_clap
from lora.modeling.loading import family_for
from lora.modeling.precision import generation_dtype
from lora.scoring import intervals, metrics
from lora.scoring.likelihood import _model_context
from lora.scoring.plots import save_spectrogram

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lora.modeling.musicgen import ModelInfo

LOUDNESS_TARGET_LUFS = -23.0   # every clip is normalised to this before embedding (EBU R128)
# frames per set for KAD (kernel matrices are O(n²)); subsampled with seed 0
KAD_MAX_FRAMES = 2000
KAD_KERNEL = "rbf"             # Gaussian kernel, median-distance bandwidth (KAD paper / kadtk)
# resamples for the FAD/KAD intervals (each one a d x d eigendecomposition / kernel
GEN_BOOTSTRAP_MAX = 200


# --------------------------------------------------------------------------------------------
# Generation metrics
# --------------------------------------------------------------------------------------------
def codec_roundtrip(model: nn.Module, wav: np.ndarray, info: ModelInfo) -> np.ndarray:
    """The clip after the base model's codec: encode, decode (what a perfect token model could
    reproduce)."""
    import torch

    fam = family_for(info)
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))[None]
    codes = fam.encode_audio(model, x, info)
    y = fam.decode_audio(model, codes, info)[0].float().cpu().numpy()
    return y[..., :wav.shape[-1]]


def _embed_all(model: nn.Module, wavs, info: ModelInfo) -> list[dict]:
    """Per clip: loudness-normalised EnCodec frames (the base model's codec latents) and librosa
    frame features."""
    from tqdm.auto import tqdm

    fam = family_for(info)
    out = []
    for w in tqdm(wavs, desc="embedding", unit="clip", leave=False):
        x = metrics.loudness_normalize(w, info.sample_rate, LOUDNESS_TARGET_LUFS)
        out.append({"encodec": fam.codec_latents(model, x),
                    "librosa": metrics.librosa_frame_features(x, info.sample_rate)})
    return out


def _distances(gen: list[dict], ref: list[dict], transform: dict) -> dict:
    """FAD and KAD in both embedding spaces between generated and reference frame sets."""
    res = {}
    for space in ("encodec", "librosa"):
        x = transform[space](np.concatenate([g[space] for g in gen]))
        y = transform[space](np.concatenate([r[space] for r in ref]))
        kad = metrics.kernel_audio_distance(metrics.subsample_rows(x, KAD_MAX_FRAMES),
                                            metrics.subsample_rows(y, KAD_MAX_FRAMES),
                                            kernel=KAD_KERNEL)
        res[space] = {"fad": metrics.frechet_audio_distance(x, y), "kad": kad, "n_clips": len(gen),
                      "n_reference_clips": len(ref), "n_frames": int(len(x)),
                      "n_reference_frames": int(len(y))}
    # One vector per clip (mean and std of the standardised librosa frames): KAD is unbiased at
    # small n, FAD is not (and its covariance would be singular), so only KAD here.
    cs = np.stack([metrics.clip_statistics(transform["librosa"](g["librosa"])) for g in gen])
    cr = np.stack([metrics.clip_statistics(transform["librosa"](r["librosa"])) for r in ref])
    res["librosa"]["kad_clip_statistics"] = (metrics.kernel_audio_distance(cs, cr, kernel=KAD_KERNEL)
                                             if len(cs) >= 2 and len(cr) >= 2 else None)
    return res


def generate_clips(model: nn.Module, processor, info: ModelInfo, which: str, prompts, seeds,
                   cfg: Config, melodies=None) -> list:
    """Audio (C, N) per (prompt, seed) pair in prompt-major order; None where generation produced
    NaN/inf. ``melodies`` (melody models): one chroma per prompt."""
    g, ev = cfg.generation, cfg.evaluation
    pairs = [(p, s, None if melodies is None else melodies[i]) for i, p in enumerate(prompts)
             for s in seeds]
    out: list = []
    for i in range(0, len(pairs), g.batch_size):
        chunk = pairs[i:i + g.batch_size]
        try:
            with _model_context(model, which):
                out += generate_audio(model, processor, info, [p for p, _, _ in chunk],
                                      [s for _, s, _ in chunk],
                                      duration=ev.eval_duration, guidance_scale=g.guidance_scale,
                                      temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                                      do_sample=g.do_sample, batch_size=g.batch_size,
                                      max_window=g.max_window,
                                      extend_stride=g.extend_stride, decoding=g.decoding,
                                      melodies=[m for _, _, m in chunk])
        except GenerationError as e:
            log.warning("%s model: generation failed for %d clip(s): %s", which, len(chunk), e)
            out += [None] * len(chunk)
    return out


def usable_clips(checks: list[dict], exclude_failed: bool = True) -> list[int]:
    """Indices of the clips that enter FAD/KAD/diversity/CLAP: those that passed every signal check,
    or (when exclude_failed is False) every finite one. Clips with NaN/Inf are never usable."""
    return [j for j, c in enumerate(checks)
            if c.get("finite", True) and "non_finite" not in c["failures"]
            and (not exclude_failed or not c["failures"])]


def generation_metrics(model: nn.Module, processor, info: ModelInfo, cfg: Config, models: list[str],
                       valid_recs, prompts: list[str], out_dir: Path, device: torch.device) -> dict:
    """Generate the prompt set with each model, check and save every clip, and compare the clips of
    the shared set (the (prompt, seed) pairs usable for every model) with the held-out reference
    audio (FAD/KAD next to their floors, diversity, CLAP when asked), each difference with a paired
    bootstrap interval."""
    ev, g = cfg.evaluation, cfg.generation
    seeds = [g.seed + j for j in range(ev.eval_seeds)]
    res: dict = {"prompts": prompts, "seeds": seeds, "clips": [], "signal": {}, "distances": {},
                 "diversity": {}, "thresholds": metrics.thresholds_dict()}
    # after the held-out likelihood (fp32): generation.dtype (auto = bf16 on GPUs and
    # AMX/AVX512-BF16 CPUs)
    gen_dtype = generation_dtype(g.dtype, device)
    # decoder (with its LoRA layers) only; EnCodec and T5 stay fp32
    cast_for_generation(model, gen_dtype)
    res["decoder_dtype"] = str(gen_dtype).replace("torch.", "")
    audio: dict[str, list] = {}
    melody = melody_prompts(info, valid_recs, prompts, cfg.model)
    t0 = time.perf_counter()
    for m in models:
        log.info("Generating %d clip(s) of %.1f s with the %s model", len(prompts) * len(seeds),
                 ev.eval_duration, m)
        audio[m] = generate_clips(model, processor, info, m, prompts, seeds, cfg,
                                  melodies=None if melody is None else melody["condition"])
    res["generation_seconds"] = time.perf_counter() - t0
    checks = {m: _check_and_save_clips(res, m, audio[m], prompts, seeds, info.sample_rate, out_dir)
              for m in models}
    res["exclude_failed_clips"] = ev.exclude_failed_clips

    log.info("Embedding %d reference clip(s) and the generated clips", len(valid_recs))
    loaded = [(r, load_audio(r.path, info.sample_rate, info.audio_channels)) for r in valid_recs]
    # (empty files were already refused by the cache)
    valid_recs = [r for r, w in loaded if w.shape[-1] > 0]
    ref_wavs = [w for _, w in loaded if w.shape[-1] > 0]
    ref = _embed_all(model, ref_wavs, info)
    lib_std = metrics.standardizer(np.concatenate([r["librosa"] for r in ref]))
    transform = {"encodec": lambda x: x, "librosa": lib_std}
    res["reference"] = {"n_clips": len(ref),
                        "seconds": float(sum(w.shape[-1] for w in ref_wavs) / info.sample_rate)}
    res["floors"] = _floors(model, info, ref, ref_wavs, transform)
    scored = score_generated(lambda m, idx: _embed_all(model, [audio[m][j] for j in idx], info),
                             checks, ref,
                             transform, len(seeds), ev.exclude_failed_clips, ev.bootstrap_samples,
                             g.seed)
    shared = scored["distance_set"]["pair_indices"]
    scored["distance_set"]["pairs"] = [[j // len(seeds), seeds[j % len(seeds)]] for j in shared]
    _mark_distance_set(res, shared, checks, ev.exclude_failed_clips)
    res["notes"] = scored.pop("notes")
    res.update(scored)
    if melody is not None:
        res["melody"] = melody_similarity(melody, audio, models, shared, len(seeds), info.sample_rate,
                                          ev.bootstrap_samples, g.seed)
        if "interval" in res["melody"] and res.get("intervals"):
            res["intervals"]["metrics"]["chroma"] = res["melody"].pop("interval")
    if ev.clap_model_path:
        res["clap"] = clap_metrics(ev.clap_model_path, models, audio, shared, prompts, seeds,
                                   valid_recs, ref_wavs,
                                   info.sample_rate, device, n_boot=ev.bootstrap_samples, seed=g.seed)
        if "interval" in res["clap"] and res.get("intervals"):
            res["intervals"]["metrics"]["clap"] = res["clap"].pop("interval")
    else:
        res["clap"] = {"skipped": "CLAP score skipped: no --clap_model_path given. For a "
                                  "text-audio score, download a CLAP model once (e.g. "
                                  "laion/larger_clap_music) into a folder and pass "
                                  "--clap_model_path FOLDER."}
    return res


def melody_prompts(info: ModelInfo, valid_recs, prompts: list[str], model_cfg=None) -> Optional[dict]:
    """Melody models: the tune each prompt follows in the evaluation, taken from the held-out clips
    themselves (the clip whose caption the prompt is, else the held-out clips in turn): {"sources":
    paths, "chroma": one-hot chromas of the clips (the similarity's reference, as audiocraft's
    chroma_cosine takes the reference audio itself), "condition": what the model follows (the
    chroma of the vocals + other stems under model.melody_chroma, as at generation)}. None for
    text-only models."""
    if not family_for(info).MELODY:
        return None
    separator = melody_separator(model_cfg) if model_cfg is not None else None
    by_caption = {}
    for r in valid_recs:
        by_caption.setdefault(r.text.strip(), r)
    sources, chromas, conditions = [], [], []
    for i, p in enumerate(prompts):
        rec = by_caption.get(p.strip(), valid_recs[i % len(valid_recs)])
        try:
            chroma, _ = melody_from_audio(load_audio(rec.path, info.sample_rate, 1), info)
            conditions.append(chroma if separator is None else melody_from_audio(
                load_audio(rec.path, info.sample_rate, 2), info, separator)[0])
        except GenerationError as e:  # (a silent held-out clip has no tune to follow)
            raise UserError(f"held-out clip {rec.path} is the melody of prompt {p!r}, but: {e} "
                            f"Remove the clip from the metadata, or pass --prompts / "
                            f"--prompts_file with other captions.") from None
        sources.append(str(rec.path))
        chromas.append(chroma)
    return {"sources": sources, "chroma": chromas, "condition": conditions,
            "chroma_from": chroma_source(separator)}


def melody_similarity(melody: dict, audio: dict, models: list[str], shared: list[int], n_seeds: int,
                      sr: int, n_boot: int, seed: int) -> dict:
    """audiocraft's chroma cosine similarity of each generated clip of the shared set to the melody
    it was given, per model, beside its floor: the similarity of the same clips to another prompt's
    melody (a shuffled pairing: what following no tune in particular scores). With both models, the
    paired bootstrap interval of LoRA minus base over the (prompt, seed) pairs."""
    n_prompts = len(melody["chroma"])
    out: dict = {"sources": melody["sources"],
                 "what": "per-frame cosine of the one-hot chroma of each clip and its melody "
                         "source, averaged (audiocraft ChromaCosineSimilarityMetric); floor: the "
                         "same clips against another prompt's melody"}
    per: dict = {}
    for m in models:
        own, other = [], []
        for j in shared:
            pi = j // n_seeds
            got = melody_chroma.chroma(audio[m][j], sr)
            own.append(melody_chroma.cosine_similarity(got, melody["chroma"][pi]))
            other.append(melody_chroma.cosine_similarity(got, melody["chroma"][(pi + 1) % n_prompts])
                         if n_prompts > 1 else None)
        per[m] = own
        floor = [x for x in other if x is not None]
        out[m] = {"mean": float(np.mean(own)) if own else None,
                  "shuffled_mean": float(np.mean(floor)) if floor else None, "per_clip": own}
    if {"base", "lora"} <= set(models) and len(shared) >= 2:
        r = intervals.paired_bootstrap_ci(per["base"], per["lora"], n_boot=n_boot, seed=seed)
        out["interval"] = _paired_interval(r,
                                           "LoRA minus base chroma similarity to the given melody; "
                                           "positive = "
                                              "LoRA follows the melody more closely")
    return out


def _check_and_save_clips(res: dict, m: str, wavs: list, prompts, seeds, sr: int,
                          out_dir: Path) -> list[dict]:
    """Signal checks of one model's clips; each finite clip is written (WAV + spectrogram) and
    listed in res["clips"]; returns the checks, one per (prompt, seed) pair in prompt-major
    order."""
    checks = []
    for j, wav in enumerate(wavs):
        pi, sd = divmod(j, len(seeds))
        seed = seeds[sd]
        stem = f"p{pi:03d}_s{seed}"
        clip = {"model": m, "prompt_index": pi, "prompt": prompts[pi], "seed": seed, "pair_index": j}
        if wav is None:
            c = {"finite": False, "failures": ["non_finite"],
                 "note": "generation produced NaN/inf logits"}
        else:
            c = metrics.signal_checks(wav, sr)
            wav_rel = f"audio/{m}/{stem}.wav"
            png_rel = f"spectrograms/{m}/{stem}.png"
            save_wav(out_dir / wav_rel, np.nan_to_num(wav), sr)
            save_spectrogram(wav, sr, out_dir / png_rel, f"{m} | seed {seed} | {prompts[pi]}")
            clip.update(wav=wav_rel, spectrogram=png_rel)
        clip["checks"] = c
        checks.append(c)
        res["clips"].append(clip)
    res["signal"][m] = metrics.summarize_checks(checks)
    return checks


def _mark_distance_set(res: dict, shared: list[int], checks: dict, exclude_failed: bool) -> None:
    """Which clips entered the distances (the shared set, for every model), and how many each model
    had usable."""
    keep = set(shared)
    for clip in res["clips"]:
        if clip["pair_index"] in keep:
            clip["used_in_distances"] = True
    for m, c in checks.items():
        res["signal"][m]["n_used_in_distances"] = len(shared)
        res["signal"][m]["n_usable_alone"] = len(usable_clips(c, exclude_failed))


def _floors(model: nn.Module, info: ModelInfo, ref: list[dict], ref_wavs: list,
            transform: dict) -> dict:
    """The scale of the distances: two halves of the reference (noise floor) and the reference
    against its own codec round-trip (codec floor)."""
    floors: dict = {}
    if len(ref) >= 2:
        floors["noise"] = _distances(ref[0::2], ref[1::2], transform)
        floors["noise"]["note"] = ("reference clips split in two halves (even / odd): the distance "
                                   "between two samples of one distribution at this size")
    else:
        floors["noise"] = None
    rt = _embed_all(model, [codec_roundtrip(model, w, info) for w in ref_wavs], info)
    floors["codec"] = _distances(rt, ref, transform)
    floors["codec"]["note"] = "reference vs its own EnCodec round-trip: the best a MusicGen model can reach"
    return floors


def distance_set(checks: dict[str, list[dict]], exclude_failed: bool = True) -> list[int]:
    """The (prompt, seed) pairs whose clips enter FAD/KAD/diversity/CLAP: those usable
    (usable_clips) for EVERY model, so the models are scored on the same set and a model that breaks
    more clips is not judged on its good ones alone."""
    sets = [set(usable_clips(c, exclude_failed)) for c in checks.values()]
    return sorted(set.intersection(*sets)) if sets else []


def score_generated(embed, checks: dict[str, list[dict]], ref: list[dict], transform: dict,
                    n_seeds: int, exclude_failed: bool, n_boot: int, seed: int) -> dict:
    """FAD/KAD and diversity of every model on the shared set, and (two models) the paired bootstrap
    intervals of the differences. ``embed(model, pair_indices)`` returns the clips' embeddings
    (_embed_all). Returns {"distance_set", "distances", "diversity", "intervals", "notes"}."""
    models = list(checks)
    shared = distance_set(checks, exclude_failed)
    n_pairs = len(next(iter(checks.values()))) if checks else 0
    usable = "passing every signal check" if exclude_failed else "finite"
    out: dict = {"distance_set": {
        "rule": (f"the (prompt, seed) pairs whose clips are {usable} for every evaluated model "
                 f"({', '.join(models)}); each model's failures are in the signal section"),
        "n_pairs": len(shared), "n_pairs_generated": n_pairs, "pair_indices": shared,
        "n_usable_alone": {m: len(usable_clips(checks[m], exclude_failed)) for m in models}},
        "distances": {}, "diversity": {}, "intervals": None, "notes": []}
    if len(shared) < 2:
        out["distances"] = {m: None for m in models}
        out["diversity"] = {m: None for m in models}
        out["notes"].append(
            f"FAD/KAD/diversity not computed: only {len(shared)} of {n_pairs} (prompt, seed) pairs "
            f"have clips {usable} for {'both models' if len(models) > 1 else 'the model'}; see the "
            f"signal checks."
            + (" --exclude_failed_clips false keeps clips that fail a check." if exclude_failed
               else ""))
        log.warning(out["notes"][-1])
        return out
    emb = {m: embed(m, shared) for m in models}
    for m in models:
        out["distances"][m] = _distances(emb[m], ref, transform)
        clip_emb = np.stack([e["encodec"].mean(axis=0) for e in emb[m]])
        out["diversity"][m] = metrics.diversity(clip_emb, [j // n_seeds for j in shared],
                                                [j % n_seeds for j in shared])
        out["diversity"][m]["space"] = "mean EnCodec latent per clip, cosine distance"
    if "base" in models and "lora" in models:
        t0 = time.perf_counter()
        out["intervals"] = distance_intervals(emb, out["distances"], ref, transform, n_boot, seed)
        out["intervals"]["metrics"]["failed_share"] = failure_interval(checks, n_boot, seed)
        out["intervals"]["seconds"] = time.perf_counter() - t0
        if len(shared) < 10:
            out["notes"].append(f"The intervals of the generated-audio differences rest on only "
                                f"{len(shared)} (prompt, seed) pairs: rough (a bootstrap over few "
                                f"pairs is too narrow); raise --num_prompts or --eval_seeds.")
    return out


def distance_intervals(emb: dict, dist: dict, ref: list[dict], transform: dict, n_boot: int,
                       seed: int) -> dict:
    """Paired bootstrap of LoRA - base FAD/KAD: the shared (prompt, seed) pairs resampled with
    replacement, both models' distances to the (fixed) reference recomputed on the same resample."""
    n = len(emb["base"])
    b = min(n_boot, GEN_BOOTSTRAP_MAX)
    counts = intervals.bootstrap_counts(n, b, seed)
    res: dict = {"resampled": "the shared (prompt, seed) pairs, with replacement; both models on "
                              "the same resample (paired); the reference set fixed",
                 "n_pairs": n, "n_boot_fad_kad": b,
                 "n_boot_note": f"FAD/KAD intervals use at most {GEN_BOOTSTRAP_MAX} resamples "
                                f"(cost); CLAP and the failure share use "
                                f"evaluation.bootstrap_samples", "metrics": {}}
    for space in ("encodec", "librosa"):
        y = transform[space](np.concatenate([r[space] for r in ref]))
        clips = {m: [transform[space](e[space]) for e in emb[m]] for m in ("base", "lora")}
        fad = {m: intervals.frechet_bootstrap(clips[m], y, counts) for m in clips}
        kad = {m: intervals.kernel_bootstrap(clips[m], y, counts, kernel=KAD_KERNEL,
                                             max_rows=KAD_MAX_FRAMES)
               for m in clips}
        res["metrics"][f"{space}.fad"] = _interval(fad, dist, (space, "fad"), n, f"FAD ({space})")
        res["metrics"][f"{space}.kad"] = _interval(kad, dist, (space, "kad", "value"), n,
                                                   f"KAD x100 ({space})")
    if dist["base"]["librosa"]["kad_clip_statistics"] is not None:
        y = np.stack([metrics.clip_statistics(transform["librosa"](r["librosa"])) for r in ref])
        kad = {m: intervals.kernel_bootstrap([metrics.clip_statistics(transform["librosa"](e["librosa"]))[None]
                                            for e in emb[m]], y, counts, kernel=KAD_KERNEL)
               for m in emb}
        res["metrics"]["librosa.kad_clip_statistics"] = _interval(
            kad, dist, ("librosa", "kad_clip_statistics", "value"), n,
            "KAD x100 (librosa clip statistics)")
    return res


def _interval(boot: dict, dist: dict, keys: tuple, n: int, label: str) -> dict:
    point = {}
    for m in ("base", "lora"):
        v = dist[m]
        for k in keys:
            v = v[k]
        point[m] = v
    out = intervals.percentile_interval(boot["lora"] - boot["base"], point["lora"] - point["base"])
    out.update(n_pairs=n, what=f"LoRA minus base {label}; negative = LoRA closer to the reference")
    return out


def failure_interval(checks: dict, n_boot: int, seed: int) -> dict:
    """Paired bootstrap over every generated (prompt, seed) pair of LoRA - base share of clips
    failing a check."""
    failed = {m: [1.0 if c["failures"] else 0.0 for c in checks[m]] for m in ("base", "lora")}
    r = intervals.paired_bootstrap_ci(failed["base"], failed["lora"], n_boot=n_boot, seed=seed)
    return _paired_interval(r,
                            "LoRA minus base share of generated clips failing a signal check "
                            "(every pair); "
                               "negative = LoRA fails less")


def _paired_interval(r: dict, what: str) -> dict:
    """A paired_bootstrap_ci result in the form of the other intervals of the generation section."""
    return {"diff": r["diff"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
            "confidence": r["confidence"], "n_boot": r["n_boot"], "p_two_sided": r["p_two_sided"],
            "excludes_zero": bool(r["ci_high"] < 0 or r["ci_low"] > 0), "n_pairs": r["n"], "what": what}


def clap_metrics(path, models, audio, shared, prompts, seeds, valid_recs, ref_wavs, sr,
                 device: torch.device, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """CLAP text-audio scores of every model on the shared (prompt, seed) pairs (the set of the
    distances), the valid clips against their captions, and (two models) the paired bootstrap
    interval of LoRA - base."""
    model, processor = load_clap(path, device=device, local_files_only=True)
    res: dict = {"model": str(path), "window_seconds": 10.0, "sample_rate": 48000}
    for m in models:
        if not shared:
            res[m] = None
            continue
        res[m] = metrics.clap_scores(model, processor, [prompts[j // len(seeds)] for j in shared],
                                     [audio[m][j] for j in shared], sr, device=device)
        res[m]["n_pairs"] = len(shared)
    if "base" in models and "lora" in models and len(shared) >= 2:
        r = intervals.paired_bootstrap_ci(res["base"]["scores"], res["lora"]["scores"],
                                          n_boot=n_boot, seed=seed)
        res["interval"] = _paired_interval(r,
                                           "LoRA minus base CLAP text-audio score on the shared "
                                           "pairs; positive "
                                              "= LoRA follows the prompts better")
    pairs = [(r.text, w) for r, w in zip(valid_recs, ref_wavs) if r.text.strip()]
    if pairs:
        res["reference"] = metrics.clap_scores(model, processor, [t for t, _ in pairs],
                                               [w for _, w in pairs], sr,
                                       device=device)
        res["reference"]["note"] = "the valid clips scored against their own captions"
    return res
