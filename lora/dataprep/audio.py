"""Audio in and out: decode any common format, resample, mix channels, cut clips, loudness. Pure
functions.

* Decoding: soundfile (libsndfile) reads WAV, FLAC, OGG/Vorbis, Opus, MP3, AIFF (and W64, CAF, ...)
  at any sample rate and bit depth. M4A/AAC/MP4 need the optional decoder PyAV (``pip install av``
  or ``bash install.sh --extras``); it is imported only when such a file is opened.
* Long files are read block by block (:func:`iter_audio`): nothing decodes a whole 20-minute file
  into memory; the streaming soxr resampler (``soxr.ResampleStream``) keeps block borders seamless.
* Arrays are float32 shaped ``(channels, samples)`` everywhere.
* :class:`DecodeCounts` (passed to :func:`iter_audio`) counts NaN/inf samples and sets them to 0
  before they reach the resampler; :func:`scale_overs` divides a clip that peaks above 0 dBFS by its
  peak, so writing it as PCM does not hard-clip it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from lora.common.cli import UserError
from lora.common.files import atomic_path

# Extensions scanned by prepare_data. Those in AV_EXTENSIONS need PyAV.
SOUNDFILE_EXTENSIONS = (".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff",
                        ".aifc", ".w64", ".caf", ".au", ".snd")
AV_EXTENSIONS = (".m4a", ".aac", ".mp4", ".m4b")
AUDIO_EXTENSIONS = SOUNDFILE_EXTENSIONS + AV_EXTENSIONS
RESAMPLE_QUALITY = "HQ"  # soxr high quality
AV_HINT = "pip install av  (or: bash install.sh --extras)"


class AudioError(UserError):
    """A file that cannot be decoded (corrupt, truncated, not audio, or a missing optional
    decoder)."""


@dataclass
class AudioInfo:
    path: str
    sample_rate: int
    channels: int
    frames: int  # as the header says (may be an estimate for compressed formats)
    duration: float  # seconds
    format: str
    subtype: str


def is_audio_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in AUDIO_EXTENSIONS


def _needs_av(path) -> bool:
    return Path(path).suffix.lower() in AV_EXTENSIONS


def _import_av(path):
    try:
        import av  # noqa: F401  (optional extra, imported lazily)
    except ImportError:
        raise AudioError(f"{path}: {Path(path).suffix} files need the optional decoder PyAV, which "
                         f"is not installed. Install it with: {AV_HINT}; or convert the file to "
                         f"WAV/FLAC.") from None
    return av


def _sf_errors():
    import soundfile as sf

    return (sf.LibsndfileError, sf.SoundFileRuntimeError, RuntimeError, ValueError, EOFError)


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Header information of an audio file; raises AudioError when it cannot be read."""
    path = str(path)
    if not os.path.isfile(path):
        raise AudioError(f"{path}: file not found")
    if _needs_av(path):
        av = _import_av(path)
        try:
            with av.open(path) as c:
                if not c.streams.audio:
                    raise AudioError(f"{path}: no audio stream")
                s = c.streams.audio[0]
                sr = int(s.codec_context.sample_rate or s.rate)
                dur = float(s.duration * s.time_base) if s.duration else float((c.duration or 0) / 1e6)
                return AudioInfo(path, sr, int(s.codec_context.channels or len(s.layout.channels)),
                                 int(round(dur * sr)), dur, c.format.name, s.codec_context.name)
        except (av.error.FFmpegError, ValueError, OSError) as e:  # type: ignore[attr-defined]
            raise AudioError(f"{path}: not a readable audio file ({e})") from None
    import soundfile as sf

    try:
        i = sf.info(path)
    except _sf_errors() as e:
        raise AudioError(f"{path}: not a readable audio file ({_short(e)})") from None
    frames = int(i.frames)
    return AudioInfo(path, int(i.samplerate), int(i.channels), frames,
                     frames / float(i.samplerate) if i.samplerate else 0.0, i.format, i.subtype)


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # (bytes decoded from memory: the decoder names its buffer object, not the file)
    s = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the file's bytes", s)
    return s[:200]


# --------------------------------------------------------------------------------------------
# Channels and sample rate
# --------------------------------------------------------------------------------------------
def mix_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """(C, N) -> (channels, N). Mono: the mean of all channels. Stereo: mono is duplicated; 5.1 (6
    ch, order L R C LFE Ls Rs) uses the ITU downmix without LFE; other layouts send even channels
    left and odd channels right. Levels are normalised so nothing clips."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    c = x.shape[0]
    if channels == c:
        return x
    if channels == 1:
        return x.mean(axis=0, keepdims=True)
    if channels != 2:
        raise ValueError(f"channels must be 1 or 2, got {channels}")
    if c == 1:
        return np.repeat(x, 2, axis=0)
    if c == 6:
        g = np.float32(1 / np.sqrt(2))
        w = np.array([[1, 0, g, 0, g, 0], [0, 1, g, 0, 0, g]], dtype=np.float32)
    else:
        w = np.zeros((2, c), dtype=np.float32)
        w[0, 0::2] = 1
        w[1, 1::2] = 1
    w /= w.sum(axis=1, keepdims=True)
    return (w @ x).astype(np.float32)


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample (C, N) float audio with soxr (high quality). Whole-array version for short audio."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if sr_in == sr_out:
        return x
    import soxr

    y = soxr.resample(np.ascontiguousarray(x.T), sr_in, sr_out, quality=RESAMPLE_QUALITY)
    return np.ascontiguousarray(y.reshape(-1, x.shape[0]).T, dtype=np.float32)


class StreamResampler:
    """Block-wise resampling with soxr.ResampleStream: feed (C, n) blocks, get seamless output."""

    def __init__(self, sr_in: int, sr_out: int, channels: int):
        self.identity = sr_in == sr_out
        self.channels = channels
        if not self.identity:
            import soxr

            self._rs = soxr.ResampleStream(sr_in, sr_out, channels, dtype="float32",
                                           quality=RESAMPLE_QUALITY)

    def __call__(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        if self.identity:
            return block
        y = self._rs.resample_chunk(np.ascontiguousarray(block.T, dtype=np.float32), last=last)
        return np.ascontiguousarray(y.reshape(-1, self.channels).T)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------
def read_native_blocks(path: str | os.PathLike, block_seconds: float = 10.0,
                       data: Optional[bytes] = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (native sample rate, (C, n) float32 block of about block_seconds) from the file, block
    by block. With ``data`` (the file's bytes, already read), those bytes are decoded and the file
    is not opened (``path`` then names them in messages and gives the format by its extension).

    Raises AudioError when the file cannot be opened or decoding fails part-way (the error says
    where).
    """
    path = str(path)
    if data is None and not os.path.isfile(path):
        raise AudioError("file not found")
    source = path if data is None else io.BytesIO(data)
    if _needs_av(path):
        yield from _read_av_blocks(path, block_seconds, source)
        return
    import soundfile as sf

    errors = _sf_errors()
    try:
        f = sf.SoundFile(source)
    except errors as e:
        raise AudioError(f"not a readable audio file ({_short(e)})") from None
    done = 0
    with f:
        sr = int(f.samplerate)
        block_frames = max(1, int(block_seconds * sr))
        while True:
            try:
                data = f.read(block_frames, dtype="float32", always_2d=True)
            except errors as e:
                raise AudioError(f"decoding failed at {done / sr:.1f} s ({_short(e)}); the file is "
                                 f"probably truncated or damaged") from None
            if data.shape[0] == 0:
                break
            done += data.shape[0]
            yield sr, np.ascontiguousarray(data.T)
            if data.shape[0] < block_frames:
                break


def _read_av_blocks(path: str, block_seconds: float, source=None) -> Iterator[tuple[int, np.ndarray]]:
    av = _import_av(path)
    try:
        container = av.open(path if source is None else source)
    except (av.error.FFmpegError, OSError, ValueError) as e:  # type: ignore[attr-defined]
        raise AudioError(f"not a readable audio file ({_short(e)})") from None
    with container:
        if not container.streams.audio:
            raise AudioError("no audio stream in the file")
        stream = container.streams.audio[0]
        sr = int(stream.codec_context.sample_rate)
        block_frames = max(1, int(block_seconds * sr))
        pending: list[np.ndarray] = []
        n = 0
        try:
            for frame in container.decode(stream):
                a = frame.to_ndarray()
                ch = len(frame.layout.channels)
                if not frame.format.is_planar:
                    a = a.reshape(-1, ch).T
                if a.dtype.kind == "i":
                    a = a.astype(np.float32) / float(np.iinfo(a.dtype).max + 1)
                elif a.dtype.kind == "u":
                    a = (a.astype(np.float32) - 128.0) / 128.0
                pending.append(np.ascontiguousarray(a, dtype=np.float32))
                n += a.shape[1]
                if n >= block_frames:
                    yield sr, np.concatenate(pending, axis=1)
                    pending, n = [], 0
        except (av.error.FFmpegError, ValueError) as e:  # type: ignore[attr-defined]
            raise AudioError(f"decoding failed ({_short(e)}); the file is probably truncated or "
                             f"damaged") from None
        if pending:
            yield sr, np.concatenate(pending, axis=1)


@dataclass
class DecodeCounts:
    """What :func:`iter_audio` saw in a file's own samples (all channels, at its own rate): how
    many, and how many were NaN or infinite (those are replaced by 0 before mixing and resampling,
    which would spread them)."""

    samples: int = 0
    nonfinite: int = 0

    def repair(self, block: np.ndarray) -> np.ndarray:
        self.samples += block.size
        finite = np.isfinite(block)
        if finite.all():
            return block
        self.nonfinite += int(block.size - np.count_nonzero(finite))
        return np.where(finite, block, np.float32(0.0)).astype(np.float32)


def iter_audio(path: str | os.PathLike, sample_rate: int, channels: int = 1,
               block_seconds: float = 10.0,
               counts: Optional[DecodeCounts] = None, data: Optional[bytes] = None) -> Iterator[np.ndarray]:
    """Decode a file of any length block by block: yields (channels, n) float32 at ``sample_rate``.

    Peak memory is a few blocks, independent of the file's length. With ``counts``, NaN/inf samples
    are replaced by 0 (counted in ``counts.nonfinite``, of ``counts.samples``) before mixing and
    resampling. With ``data``, the file's bytes already read are decoded (``read_native_blocks``).
    """
    rs: Optional[StreamResampler] = None
    for sr, block in read_native_blocks(path, block_seconds, data):
        if counts is not None:
            block = counts.repair(block)
        if rs is None:
            rs = StreamResampler(sr, sample_rate, channels)
        out = rs(mix_channels(block, channels))
        if out.shape[1]:
            yield out
    if rs is None:
        return  # empty file
    out = rs(np.zeros((channels, 0), np.float32), last=True)
    if out.shape[1]:
        yield out


def load_audio(path: str | os.PathLike, sample_rate: int = 32000, channels: int = 1,
               offset: float = 0.0, duration: Optional[float] = None,
               data: Optional[bytes] = None) -> np.ndarray:
    """Decode a (short) file to float32 (channels, N) at sample_rate. Raises AudioError naming the
    file.

    ``offset``/``duration`` (seconds, at the output rate) select a part; only that part is kept in
    memory. ``data``: the file's bytes, already read: those are decoded, the file is not opened
    (the token cache hashes and decodes the same bytes).
    """
    start = int(round(offset * sample_rate))
    stop = None if duration is None else start + int(round(duration * sample_rate))
    parts = []
    pos = 0
    try:
        for block in iter_audio(path, sample_rate, channels, data=data):
            n = block.shape[1]
            lo, hi = max(start - pos, 0), n if stop is None else min(stop - pos, n)
            if hi > lo:
                parts.append(block[:, lo:hi])
            pos += n
            if stop is not None and pos >= stop:
                break
    except AudioError as e:
        msg = str(e)
        raise AudioError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    if not parts:
        if pos == 0:
            raise AudioError(f"{path}: the file holds no audio samples")
        return np.zeros((channels, 0), np.float32)
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """Float audio -> int16 (round to nearest, clip), as save_wav stores it."""
    a = np.asarray(audio, dtype=np.float32)
    return np.clip(np.round(a * np.float32(32768.0)), -32768, 32767).astype(np.int16)


def save_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int,
             subtype: str = "PCM_16") -> Path:
    """Write (C, N) float audio as WAV atomically (temp file + rename). PCM is clipped to [-1,
    1]."""
    import soundfile as sf

    a = np.asarray(audio, dtype=np.float32)
    if a.ndim == 1:
        a = a[None]
    if subtype.upper() == "PCM_16":
        a = to_pcm16(a)  # quantised here, so pcm16_hash() is exactly the stored samples' hash
    elif subtype.upper().startswith("PCM"):
        a = np.clip(a, -1.0, 1.0)
    with atomic_path(path) as tmp:
        try:
            sf.write(str(tmp), np.ascontiguousarray(a.T), int(sample_rate), subtype=subtype, format="WAV")
        except (RuntimeError, sf.LibsndfileError):
            # libsndfile reports a full disk as "System error": say what it is (callers handle
            # OSError ENOSPC)
            if _disk_free(Path(tmp).parent) < a.size * 4 + 65536:
                raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
            raise
    return Path(path)


def _disk_free(folder: Path) -> int:
    import shutil

    return shutil.disk_usage(folder).free


def pcm16_hash(audio: np.ndarray) -> str:
    """Content hash of (C, N) audio as save_wav stores it in a PCM16 file (finds duplicate
    clips)."""
    return hashlib.sha1(to_pcm16(audio).astype("<i2").tobytes()).hexdigest()[:16]


def file_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for b in iter(lambda: fh.read(chunk), b""):
            h.update(b)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Levels
# --------------------------------------------------------------------------------------------
def db_to_amp(db: float) -> float:
    return float(10.0 ** (db / 20.0))


def rms_db(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return -np.inf
    r = float(np.sqrt(np.mean(x * x)))
    return 20.0 * np.log10(r) if r > 0 else -np.inf


AUDIBLE_HZ = 20.0            # below: infrasound, nothing to hear or learn (a DC offset is 0 Hz)
CODEC_FRAME_SECONDS = 0.02   # one EnCodec frame of MusicGen (50 frames/s): the shortest clip it reads
MUSICGEN_SAMPLE_RATE = 32000  # every MusicGen model's rate


def audible_db(x: np.ndarray, sr: int, low_hz: float = AUDIBLE_HZ) -> float:
    """Level (dBFS RMS) of the audible part of ``x`` (C, N): its content at ``low_hz`` and above.
    A DC offset or infrasound alone (a 1 Hz tone) is loud by rms_db and silent here."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[-1] == 0:
        return -np.inf
    spec = np.fft.rfft(x, axis=-1)
    spec[..., :int(np.ceil(low_hz * x.shape[-1] / sr))] = 0
    return rms_db(np.fft.irfft(spec, n=x.shape[-1], axis=-1))


def peak_db(x: np.ndarray) -> float:
    p = float(np.max(np.abs(x))) if np.size(x) else 0.0
    return 20.0 * np.log10(p) if p > 0 else -np.inf


def loudness_lufs(x: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness (ITU-R BS.1770, pyloudnorm) of (C, N) audio; -inf for silence/too
    short."""
    import pyloudnorm

    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.shape[1] < int(0.4 * sample_rate) + 1:
        return -np.inf
    return float(pyloudnorm.Meter(sample_rate).integrated_loudness(x.T))


def scale_overs(x: np.ndarray) -> tuple[np.ndarray, Optional[float]]:
    """(audio, None) when it fits PCM (peak <= 1.0, 0 dBFS); otherwise (audio / peak, its peak in
    dBFS), so writing it as PCM does not hard-clip the overs (float WAVs, MP3/OGG decoders,
    resampling)."""
    p = float(np.max(np.abs(x))) if np.size(x) else 0.0
    if not p > 1.0:
        return x, None
    return (np.asarray(x, dtype=np.float32) / np.float32(p)).astype(np.float32), 20.0 * np.log10(p)


def normalize_peak(x: np.ndarray, target_db: float = -1.0) -> np.ndarray:
    p = float(np.max(np.abs(x))) if np.size(x) else 0.0
    if p <= 0:
        return np.asarray(x, dtype=np.float32)
    return (np.asarray(x, dtype=np.float32) * (db_to_amp(target_db) / p)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Cutting a stream into clips
# --------------------------------------------------------------------------------------------
class ClipCutter:
    """Cut a stream of (C, n) blocks into clips of ``segment_seconds`` with bounded memory.

    With ``trim_silence``, leading silence is skipped and trailing silence (after the last sample
    above ``silence_db``) is not emitted. A silent stretch longer than ``hold_seconds`` inside the
    stream is cut like music (silent clips are then dropped by the caller), so memory stays bounded.
    ``push`` and ``finish`` return lists of (offset_samples, clip). After ``finish``:
    ``tail_samples`` is the length of a final piece shorter than ``min_seconds`` that was dropped,
    ``lead_samples`` / ``trail_samples`` the trimmed silence.
    """

    def __init__(self, sample_rate: int, segment_seconds: float, min_seconds: float, *,
                 trim_silence: bool = True,
                 silence_db: float = -50.0, hold_seconds: Optional[float] = None):
        self.sr = sample_rate
        self.seg = max(1, int(round(segment_seconds * sample_rate)))
        self.min = max(1, int(round(min_seconds * sample_rate)))
        self.trim = trim_silence
        self.thr = db_to_amp(silence_db)
        self.hold = self.seg + int(round((segment_seconds if hold_seconds is None else hold_seconds)
                                         * sample_rate))
        self.pos = 0  # absolute index of the next incoming sample
        self.buf: Optional[np.ndarray] = None
        self.buf_start = 0  # absolute index of buf[:, 0]
        self.started = not trim_silence
        self.last_loud = -1
        self.any_loud = False
        self.lead_samples = 0
        self.trail_samples = 0
        self.tail_samples = 0
        self.total_samples = 0

    def push(self, block: np.ndarray) -> list[tuple[int, np.ndarray]]:
        n = block.shape[1]
        self.total_samples += n
        loud = np.flatnonzero(np.max(np.abs(block), axis=0) > self.thr) if n else np.zeros(0, int)
        if loud.size:
            self.any_loud = True
        if not self.started:
            if loud.size == 0:
                self.pos += n
                self.lead_samples += n
                return []
            first = int(loud[0])
            block = block[:, first:]
            self.pos += first
            self.lead_samples += first
            loud = loud - first
            self.started = True
            self.buf_start = self.pos
        if loud.size:
            self.last_loud = self.pos + int(loud[-1])
        self.buf = block if self.buf is None else np.concatenate([self.buf, block], axis=1)
        self.pos += block.shape[1]
        return self._emit(final=False)

    def _take(self, n: int) -> tuple[int, np.ndarray]:
        clip = np.ascontiguousarray(self.buf[:, :n])
        off = self.buf_start
        self.buf = self.buf[:, n:]
        self.buf_start += n
        return off, clip

    def _emit(self, final: bool) -> list[tuple[int, np.ndarray]]:
        out = []
        while self.buf is not None:
            end = (self.last_loud + 1) if self.trim else self.pos
            confirmed = end - self.buf_start
            buffered = self.pos - self.buf_start
            if confirmed >= self.seg or (not final and buffered >= self.hold):
                out.append(self._take(self.seg))
                continue
            if final:
                confirmed = max(confirmed, 0)
                self.trail_samples = buffered - confirmed
                if confirmed >= self.min:
                    out.append(self._take(confirmed))
                else:
                    self.tail_samples = confirmed
                self.buf = None
            break
        return out

    def finish(self) -> list[tuple[int, np.ndarray]]:
        if not self.started:
            return []
        return self._emit(final=True)


# --------------------------------------------------------------------------------------------
# Tempo and key (prepare_data --enrich_captions)
# --------------------------------------------------------------------------------------------
_PITCHES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
# Krumhansl-Kessler key profiles
_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def estimate_key(chroma_mean: np.ndarray) -> str:
    """Key name ("A minor") whose Krumhansl-Kessler profile correlates best with a 12-bin chroma
    vector."""
    best, name = -np.inf, ""
    for tonic in range(12):
        for prof, mode in ((_MAJOR, "major"), (_MINOR, "minor")):
            r = np.corrcoef(np.roll(prof, tonic), chroma_mean)[0, 1]
            if np.isfinite(r) and r > best:
                best, name = r, f"{_PITCHES[tonic]} {mode}"
    return name


def estimate_tempo_key(audio: np.ndarray, sample_rate: int) -> dict:
    """{'bpm': float, 'key': str} estimated with librosa (beat tracker, chroma + key profiles)."""
    import librosa

    y = mix_channels(audio, 1)[0].astype(np.float32)
    out: dict = {}
    if y.size < sample_rate or not np.any(y):
        return out
    tempo, _ = librosa.beat.beat_track(y=y, sr=sample_rate)
    bpm = float(np.atleast_1d(tempo)[0])
    if np.isfinite(bpm) and bpm > 0:
        out["bpm"] = round(bpm, 1)
    # tuning=0: skip librosa's tuning estimate (piptrack's numba gufunc crashes on some numba/numpy
    # builds)
    chroma = librosa.feature.chroma_stft(y=y, sr=sample_rate, tuning=0.0)
    key = estimate_key(chroma.mean(axis=1))
    if key:
        out["key"] = key
    return out
