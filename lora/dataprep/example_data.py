"""The synthetic example dataset of ``prepare_data.py --create_example``: four clearly different
styles.

Techno drums, a funk bass line with electric-piano stabs, a plucked synth arpeggio and an ambient
pad, each with a caption naming its style, tempo and key. Everything is drawn from one seeded numpy
generator, so the same settings always give the same WAV bytes and captions. ``synth_clip`` makes
one clip; ``write_example_clips`` writes the whole set into data_dir/train and data_dir/valid (every
style in both splits) and returns its metadata records. Used by lora/prepare_data.py (which also
writes metadata.json and its state and report files).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from lora.dataprep import audio as A
from lora.dataset import ClipRecord

KEYS = {"C major": (60, "major"), "G major": (67, "major"), "D major": (62, "major"),
        "F major": (65, "major"),
        "A minor": (57, "minor"), "E minor": (64, "minor"), "D minor": (62, "minor"),
        "B minor": (59, "minor")}
PROGRESSIONS = {"major": [(0, 4, 7), (7, 11, 14), (9, 12, 16), (5, 9, 12)],  # I V vi IV
                "minor": [(0, 3, 7), (8, 12, 15), (3, 7, 10), (10, 14, 17)]}  # i VI III VII


def _hz(midi):
    return 440.0 * 2.0 ** ((np.asarray(midi, dtype=np.float64) - 69.0) / 12.0)


def _place(out: np.ndarray, sound: np.ndarray, start: int) -> None:
    if start >= out.size:
        return
    n = min(sound.size, out.size - start)
    out[start:start + n] += sound[:n]


def _lowpass(x: np.ndarray, cutoff: float, sr: int) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    return sosfilt(butter(2, min(cutoff, 0.45 * sr), fs=sr, output="sos"), x)


def _drums(sr, n, bpm, rng):
    out = np.zeros(n)
    beat = 60.0 / bpm
    t = np.arange(int(0.35 * sr)) / sr
    kick = np.sin(2 * np.pi * np.cumsum(45 + 110 * np.exp(-t * 28)) / sr) * np.exp(-t * 9)
    tc = np.arange(int(0.18 * sr)) / sr
    clap = np.diff(rng.standard_normal(tc.size + 1)) * np.exp(-tc * 25) * 0.35
    th = np.arange(int(0.05 * sr)) / sr
    hat = np.diff(np.diff(rng.standard_normal(th.size + 2))) * np.exp(-th * 90) * 0.12
    for i in range(int(n / sr / beat * 4) + 1):  # sixteenth grid
        pos = int(i * beat / 4 * sr)
        if i % 4 == 0:
            _place(out, kick * rng.uniform(0.85, 1.0), pos)
        if i % 8 == 4:
            _place(out, clap, pos)
        if i % 2 == 1:
            _place(out, hat * (1.0 if i % 4 == 2 else 0.6), pos)
    return out


def _pluck(freq, sr, dur, bright=6):
    t = np.arange(int(dur * sr)) / sr
    y = sum(np.sin(2 * np.pi * freq * h * t) * np.exp(-t * (5 + 3 * h)) / h for h in range(1, bright + 1))
    return y * np.minimum(1.0, t * 400)


def _bass_chords(sr, n, bpm, root, mode, rng):
    out = np.zeros(n)
    beat = 60.0 / bpm
    prog = PROGRESSIONS[mode]
    t_all = np.arange(n) / sr
    bar = 4 * beat
    # sawtooth bass on eighth notes, root of the chord, two octaves down
    bass = np.zeros(n)
    step = beat / 2
    for i in range(int(n / sr / step) + 1):
        chord = prog[int(i * step / bar) % len(prog)]
        f = _hz(root - 24 + chord[0])
        s0, s1 = int(i * step * sr), min(n, int((i + 0.8) * step * sr))
        if s0 >= n:
            break
        tt = t_all[s0:s1] - t_all[s0]
        # velocity
        bass[s0:s1] += (2 * ((f * tt) % 1.0) - 1.0) * np.exp(-tt * 4) * rng.uniform(0.7, 1.0)
    out += _lowpass(bass, 500, sr) * 0.55
    # electric-piano chord stabs on the off-beats
    for i in range(int(n / sr / beat) + 1):
        chord = prog[int(i * beat / bar) % len(prog)]
        pos = int((i + 0.5) * beat * sr)
        stab = sum(_pluck(_hz(root + c), sr, beat * 0.45, bright=3)
                   for c in chord) * 0.12 * rng.uniform(0.6, 1.0)
        _place(out, stab, pos)
    return out


def _arpeggio(sr, n, bpm, root, mode, rng):
    out = np.zeros(n)
    beat = 60.0 / bpm
    prog = PROGRESSIONS[mode]
    step = beat / 4
    pattern = [[0, 1, 2, 3, 2, 1], [0, 1, 2, 3], [3, 2, 1, 0], [0, 2, 1, 3]][int(rng.integers(4))]
    for i in range(int(n / sr / step) + 1):
        chord = prog[int(i * step / (4 * beat)) % len(prog)]
        notes = [chord[0], chord[1], chord[2], chord[0] + 12]
        f = _hz(root + 12 + notes[pattern[i % len(pattern)]])
        _place(out, _pluck(f, sr, step * 2.5, bright=8) * 0.3 * rng.uniform(0.6, 1.0), int(i * step * sr))
    return out


def _pad(sr, n, bpm, root, mode, rng):
    out = np.zeros(n)
    prog = PROGRESSIONS[mode]
    t = np.arange(n) / sr
    chord_len = 2 * 4 * 60.0 / bpm  # two bars per chord
    for ci in range(int(n / sr / chord_len) + 1):
        s0 = int(ci * chord_len * sr)
        if s0 >= n:
            break
        s1 = min(n, int((ci + 1) * chord_len * sr) + int(0.8 * sr))
        tt = t[s0:s1] - t[s0]
        env = np.minimum(1.0, tt / 1.2) * np.minimum(1.0, (tt[-1] - tt) / 0.8 + 1e-3)
        chord = prog[ci % len(prog)]
        voice = np.zeros(s1 - s0)
        for c in chord:
            for det in (-0.07, 0.0, 0.07):  # detuned voices: a wide, warm pad
                f = _hz(root + c + det)
                voice += np.sin(2 * np.pi * f * tt + rng.uniform(0, 2 * np.pi))
        out[s0:s1] += voice * env * 0.06
    return _lowpass(out, 2500, sr)


# style -> (caption pattern, BPM choices, tonal?)
STYLES = {
    "techno_drums": ("techno drum loop, punchy four-on-the-floor kick, claps and crisp hi-hats, no "
                     "melody, {bpm} BPM", (122, 126, 128, 132), False),
    "funk_bass": ("funky bass groove with electric piano chord stabs, sawtooth bass line, {bpm} "
                  "BPM, {key}", (96, 100, 104, 110), True),
    "synth_arpeggio": ("bright plucked synth arpeggio, fast sixteenth notes, electronic, {bpm} "
                       "BPM, {key}", (110, 116, 120, 124), True),
    "ambient_pad": ("slow ambient pad, warm sustained detuned chords, calm, no drums, {bpm} BPM, {key}",
                    (60, 66, 70, 76), True),
}


def synth_clip(style: str, seconds: float, sample_rate: int, channels: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, str]:
    """One synthetic clip of a style: ((channels, N) float32, caption)."""
    pattern, bpms, tonal = STYLES[style]
    bpm = int(rng.choice(bpms))
    key = str(rng.choice(sorted(KEYS))) if tonal else ""
    root, mode = KEYS[key] if tonal else (60, "major")
    n = int(round(seconds * sample_rate))
    if style == "techno_drums":
        y = _drums(sample_rate, n, bpm, rng)
    elif style == "funk_bass":
        y = _bass_chords(sample_rate, n, bpm, root, mode, rng)
    elif style == "synth_arpeggio":
        y = _arpeggio(sample_rate, n, bpm, root, mode, rng)
    else:
        y = _pad(sample_rate, n, bpm, root, mode, rng)
    y = A.normalize_peak(y[None], -3.0)
    if channels == 2:
        pan = float(rng.uniform(-0.3, 0.3))
        y = np.concatenate([y * (1 - pan), y * (1 + pan)]) / (1 + abs(pan))
    return y.astype(np.float32), pattern.format(bpm=bpm, key=key)


def write_example_clips(data_dir: Path, *, clips: int, seconds: float, sample_rate: int, channels: int,
                        valid_fraction: float, seed: int) -> list[ClipRecord]:
    """Write `clips` synthetic clips (styles in turn) as
    data_dir/{train,valid}/example_<style>_<i>.wav.

    Each style puts round(valid_fraction * its clips) of its last clips in valid (at least one, and
    at least one left for train: every style needs 2 clips, so clips >= 2 * len(STYLES), which
    prepare_data's settings check asks for). Returns the clips' records, in clip order.
    """
    rng = np.random.default_rng(seed)
    styles = list(STYLES)
    per_style = defaultdict(list)
    for i in range(clips):
        per_style[styles[i % len(styles)]].append(i)
    valid_ids = set()
    for idxs in per_style.values():
        k = min(len(idxs) - 1, max(1, round(valid_fraction * len(idxs))))
        valid_ids.update(idxs[-k:])
    records = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    it = range(clips)
    for i in (tqdm(it, desc="example clips", leave=False) if tqdm else it):
        style = styles[i % len(styles)]
        y, text = synth_clip(style, seconds, sample_rate, channels, rng)
        split = "valid" if i in valid_ids else "train"
        cid = f"example_{style}_{i:03d}"
        rel = f"{split}/{cid}.wav"
        A.save_wav(data_dir / rel, y, sample_rate)
        records.append(ClipRecord(id=cid, audio=rel, text=text,
                                  duration=round(y.shape[1] / sample_rate, 4),
                                  split=split, source=f"example/{style}/{i:03d}", offset=0.0))
    return records
