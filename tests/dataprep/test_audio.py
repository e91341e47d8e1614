"""lora/dataprep/audio.py: decoding every format soundfile writes, any rate / bit depth / channel
count, block-wise resampling, mix-down, clip cutting, atomic WAV writes, levels and tempo/key
estimates. CPU only, fast."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import soundfile as sf

from lora.dataprep import audio as A

SR = 32000


def tone(freq, seconds, sr, amp=0.5, channels=1):
    t = np.arange(int(round(seconds * sr))) / sr
    y = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([y] * channels, axis=1) if channels > 1 else y


def peak_freq(y, sr):
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    spec = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    return np.fft.rfftfreq(y.size, 1 / sr)[np.argmax(spec)]


def rms(y):
    return float(np.sqrt(np.mean(np.asarray(y, dtype=np.float64) ** 2)))


# ---- formats --------------------------------------------------------------------------------
FORMATS = [
    ("wav", "WAV", "PCM_16", 44100),
    ("flac", "FLAC", "PCM_24", 44100),
    ("ogg", "OGG", "VORBIS", 44100),
    ("opus", "OGG", "OPUS", 48000),
    ("mp3", "MP3", "MPEG_LAYER_III", 44100),
    ("aiff", "AIFF", "PCM_16", 44100),
]


@pytest.mark.parametrize("ext,fmt,subtype,sr", FORMATS, ids=[f[0] for f in FORMATS])
def test_every_soundfile_format_decodes_to_32k(tmp_path, ext, fmt, subtype, sr):
    p = tmp_path / f"x.{ext}"
    sf.write(p, tone(440, 2.0, sr, channels=2), sr, format=fmt, subtype=subtype)
    info = A.audio_info(p)
    assert info.sample_rate == sr and info.channels == 2
    y = A.load_audio(p, SR, 1)
    assert y.dtype == np.float32 and y.ndim == 2 and y.shape[0] == 1
    # lossy codecs add a little encoder delay/padding; the length stays within 0.1 s
    assert abs(y.shape[1] - 2 * SR) < 0.1 * SR
    mid = y[0, SR // 4: SR + SR // 4]
    assert abs(peak_freq(mid, SR) - 440) < 3
    assert rms(mid) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000, 96000])
def test_any_sample_rate_is_resampled_exactly(tmp_path, sr):
    p = tmp_path / f"r{sr}.wav"
    sf.write(p, tone(1000, 0.5, sr), sr, subtype="FLOAT")
    y = A.load_audio(p, SR, 1)
    assert abs(y.shape[1] - SR // 2) <= 1
    core = y[0, 1000:-1000]
    assert abs(peak_freq(core, SR) - 1000) < 5
    assert rms(core) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


@pytest.mark.parametrize("fmt,subtype,tol", [("WAV", "PCM_U8", 1 / 100), ("AIFF", "PCM_S8", 1 / 100),
                                             ("WAV", "PCM_16", 1e-4), ("WAV", "PCM_24", 1e-6),
                                             ("WAV", "PCM_32", 1e-6), ("WAV", "FLOAT", 1e-7),
                                             ("FLAC", "PCM_S8", 1 / 100)])
def test_bit_depths_decode_to_the_same_values(tmp_path, fmt, subtype, tol):
    p = tmp_path / f"b_{subtype}.{'aiff' if fmt == 'AIFF' else fmt.lower()}"
    x = tone(440, 0.25, SR, amp=0.6)
    sf.write(p, x, SR, format=fmt, subtype=subtype)
    y = A.load_audio(p, SR, 1)  # same rate: no resampling, only decoding
    assert y.shape == (1, x.size)
    assert np.max(np.abs(y[0] - x)) < tol


def test_six_channels_mix_down_to_mono_and_stereo(tmp_path):
    sr = 48000
    n = sr // 2
    chans = np.stack([tone(f, 0.5, sr, amp=0.3) for f in (200, 300, 400, 500, 600, 700)], axis=1)
    p = tmp_path / "surround.wav"
    sf.write(p, chans, sr, subtype="PCM_24")
    assert A.audio_info(p).channels == 6
    mono = A.load_audio(p, sr, 1)
    assert mono.shape == (1, n)
    np.testing.assert_allclose(mono[0], chans.mean(axis=1), atol=1e-5)
    st = A.load_audio(p, sr, 2)
    assert st.shape == (2, n)
    # 5.1 (L R C LFE Ls Rs): left holds L, C, Ls and not R, LFE, Rs
    specl = np.abs(np.fft.rfft(st[0]))
    specr = np.abs(np.fft.rfft(st[1]))
    f = np.fft.rfftfreq(n, 1 / sr)
    at = lambda s, hz: s[np.argmin(np.abs(f - hz))]  # noqa: E731
    assert at(specl, 200) > 100 * at(specl, 300) and at(specl, 600) > 100 * at(specl, 700)
    assert at(specr, 300) > 100 * at(specr, 200) and at(specr, 700) > 100 * at(specr, 600)
    assert at(specl, 500) < 1e-3 * at(specl, 200)  # LFE left out
    assert np.max(np.abs(st)) <= 0.3 + 1e-4  # normalised: no gain, no clipping


def test_mono_becomes_stereo_by_duplication():
    x = tone(300, 0.1, SR)[None]
    st = A.mix_channels(x, 2)
    assert st.shape == (2, x.shape[1]) and np.array_equal(st[0], st[1]) and np.array_equal(st[0], x[0])


def test_streaming_resampler_matches_whole_file(tmp_path):
    sr = 44100
    x = np.random.default_rng(0).standard_normal(sr * 3).astype(np.float32) * 0.1
    p = tmp_path / "noise.wav"
    sf.write(p, x, sr, subtype="FLOAT")
    blocks = list(A.iter_audio(p, SR, 1, block_seconds=0.37))
    assert len(blocks) > 5
    streamed = np.concatenate(blocks, axis=1)
    whole = A.resample(x[None], sr, SR)
    assert streamed.shape == whole.shape
    np.testing.assert_allclose(streamed, whole, atol=2e-4)


def test_nan_and_inf_samples_are_counted_and_set_to_zero_before_resampling(tmp_path):
    sr = 44100
    x = tone(440, 2.0, sr, amp=0.3, channels=2)
    x[1000, 0], x[5000, 1], x[7000, 0] = np.nan, np.inf, -np.inf
    p = tmp_path / "nan.wav"
    sf.write(p, x, sr, subtype="FLOAT")
    counts = A.DecodeCounts()
    y = np.concatenate(list(A.iter_audio(p, SR, 1, counts=counts)), axis=1)
    assert (counts.nonfinite, counts.samples) == (3, x.size)
    assert np.isfinite(y).all() and rms(y) == pytest.approx(0.3 / np.sqrt(2), rel=0.02)
    # without: spread
    assert not np.isfinite(np.concatenate(list(A.iter_audio(p, SR, 1)), axis=1)).all()


def test_scale_overs_only_touches_audio_above_full_scale():
    x = tone(440, 0.5, SR, amp=0.9)[None]
    same, db = A.scale_overs(x)
    assert same is x and db is None
    loud, db = A.scale_overs(x * 2)
    assert db == pytest.approx(20 * np.log10(1.8),
                               abs=1e-3) and np.max(np.abs(loud)) == pytest.approx(1.0)
    np.testing.assert_allclose(loud, x / 0.9, rtol=1e-5, atol=1e-6)


def test_load_audio_offset_and_duration(tmp_path):
    x = np.linspace(-0.5, 0.5, SR * 3, dtype=np.float32)
    p = tmp_path / "ramp.wav"
    sf.write(p, x, SR, subtype="FLOAT")
    y = A.load_audio(p, SR, 1, offset=1.0, duration=0.5)
    np.testing.assert_array_equal(y[0], x[SR:SR + SR // 2])


# ---- errors ---------------------------------------------------------------------------------
def test_text_file_renamed_wav_is_a_clear_error(tmp_path):
    p = tmp_path / "notes.wav"
    p.write_text("this is not audio")
    with pytest.raises(A.AudioError, match="not a readable audio file"):
        A.load_audio(p, SR)
    with pytest.raises(A.AudioError, match="notes.wav"):
        A.audio_info(p)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(A.AudioError, match=r"nope\.wav: file not found"):
        A.load_audio(tmp_path / "nope.wav", SR)


def test_truncated_flac_is_an_audio_error_not_a_crash(tmp_path):
    p = tmp_path / "cut.flac"
    sf.write(p, tone(440, 12, 44100), 44100)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(A.AudioError, match="truncated or damaged"):
        A.load_audio(p, SR)


def test_m4a_without_pyav_names_the_extra(tmp_path, monkeypatch):
    # makes `import av` fail even where PyAV is installed
    monkeypatch.setitem(sys.modules, "av", None)
    p = tmp_path / "song.m4a"
    p.write_bytes(b"\x00\x00\x00\x20ftypM4A ")
    for fn in (lambda: A.load_audio(p, SR), lambda: A.audio_info(p)):
        with pytest.raises(A.AudioError) as e:
            fn()
        assert "pip install av" in str(e.value) and "install.sh --extras" in str(e.value)


# ---- writing and levels -----------------------------------------------------------------------
def test_save_wav_is_atomic_pcm16_and_clips(tmp_path):
    x = np.stack([tone(440, 0.2, SR, amp=1.5), tone(440, 0.2, SR, amp=0.25)])
    out = A.save_wav(tmp_path / "o" / "clip.wav", x, SR)
    assert [q.name for q in out.parent.iterdir()] == ["clip.wav"]  # no temp file left behind
    info = sf.info(out)
    assert (info.samplerate, info.channels, info.subtype) == (SR, 2, "PCM_16")
    y, _ = sf.read(out, dtype="float32")
    assert np.max(np.abs(y[:, 0])) <= 1.0 and np.max(np.abs(y[:, 0])) > 0.99
    np.testing.assert_allclose(y[:, 1], x[1], atol=1 / 32767)
    # the hash is that of the stored samples: duplicates are found
    q, _ = sf.read(out, dtype="int16")
    import hashlib
    assert A.pcm16_hash(x) == hashlib.sha1(np.ascontiguousarray(q.T).astype("<i2").tobytes()).hexdigest()[:16]
    assert A.pcm16_hash(x) != A.pcm16_hash(x * 0.5)


def test_levels():
    x = tone(997, 1.0, 48000, amp=0.5)[None]
    assert A.peak_db(x) == pytest.approx(20 * np.log10(0.5), abs=0.01)
    assert A.rms_db(x) == pytest.approx(20 * np.log10(0.5 / np.sqrt(2)), abs=0.01)
    assert A.rms_db(np.zeros((1, 10))) == -np.inf
    # BS.1770: a full-scale 997 Hz sine reads about -3 LUFS
    assert A.loudness_lufs(x * 2, 48000) == pytest.approx(-3.0, abs=0.3)
    assert np.max(np.abs(A.normalize_peak(x, -6.0))) == pytest.approx(10 ** (-6 / 20), rel=1e-5)


@pytest.mark.slow
def test_tempo_and_key_estimates():
    sr = 22050
    y = np.zeros(sr * 8, dtype=np.float32)
    click = tone(1500, 0.03, sr, amp=0.9)
    click = click * np.exp(-np.arange(click.size) / 100)
    for k in range(16):  # 120 BPM click track
        s = int(k * 0.5 * sr)
        y[s:s + click.size] += click
    est = A.estimate_tempo_key(y[None], sr)
    assert est["bpm"] == pytest.approx(120, abs=4)
    assert A.estimate_key(np.roll(A._MAJOR, 2)) == "D major"
    assert A.estimate_key(np.roll(A._MINOR, 9)) == "A minor"


# ---- cutting --------------------------------------------------------------------------------
def _cut(y, sr, block, **kw):
    c = A.ClipCutter(sr, **kw)
    out = []
    for i in range(0, y.shape[1], block):
        out += c.push(y[:, i:i + block])
    out += c.finish()
    return c, out


def test_cutter_trims_silence_and_keeps_long_recordings():
    sr = 1000
    music = np.full((1, 75 * sr), 0.1, np.float32)
    y = np.concatenate([np.zeros((1, 3 * sr), np.float32), music,
                        np.zeros((1, 4 * sr), np.float32)], axis=1)
    c, out = _cut(y, sr, 777, segment_seconds=30, min_seconds=5)
    assert [o for o, _ in out] == [3 * sr, 33 * sr, 63 * sr]
    assert [clip.shape[1] for _, clip in out] == [30 * sr, 30 * sr, 15 * sr]
    assert all(np.all(clip == np.float32(0.1)) for _, clip in out)
    assert c.lead_samples == 3 * sr and c.trail_samples == 4 * sr and c.tail_samples == 0


def test_cutter_counts_a_short_tail():
    sr = 1000
    y = np.full((1, 62 * sr), 0.1, np.float32)
    c, out = _cut(y, sr, 5000, segment_seconds=30, min_seconds=5)
    assert [clip.shape[1] for _, clip in out] == [30 * sr, 30 * sr]
    assert c.tail_samples == 2 * sr


def test_cutter_memory_is_bounded_by_a_long_silent_gap():
    sr = 1000
    y = np.concatenate([np.full((1, 10 * sr), 0.1), np.zeros((1, 300 * sr)), np.full((1, 10 * sr), 0.1)],
                       axis=1).astype(np.float32)
    c = A.ClipCutter(sr, 30, 5)
    biggest = 0
    out = []
    for i in range(0, y.shape[1], 1000):
        out += c.push(y[:, i:i + 1000])
        biggest = max(biggest, c.buf.shape[1])
    out += c.finish()
    assert biggest <= 61 * sr  # a segment plus the hold window, not the whole 5-minute gap
    total = sum(clip.shape[1] for _, clip in out)
    assert total == y.shape[1]  # the gap is inside the music, so nothing is trimmed
    silent = [clip for _, clip in out if A.rms_db(clip) < -50]
    assert len(silent) >= 8  # cut as silent clips, which prepare_data drops


def test_m4a_aac_decodes_with_pyav(tmp_path):
    av = pytest.importorskip("av", reason="PyAV (optional extra: bash install.sh --extras) not installed")
    sr = 44100
    x = tone(440, 3.0, sr)
    p = tmp_path / "phone.m4a"
    with av.open(str(p), "w") as c:
        s = c.add_stream("aac", rate=sr, layout="stereo")
        fr = av.AudioFrame.from_ndarray(np.stack([x, x]), format="fltp", layout="stereo")
        fr.sample_rate = sr
        for pkt in list(s.encode(fr)) + list(s.encode(None)):
            c.mux(pkt)
    info = A.audio_info(p)
    assert (info.sample_rate, info.channels) == (sr, 2) and info.duration == pytest.approx(3.0, abs=0.1)
    y = A.load_audio(p, SR, 2)
    assert y.shape[0] == 2 and abs(y.shape[1] - 3 * SR) < 0.1 * SR
    mid = y[0, SR // 2: 2 * SR]
    assert abs(peak_freq(mid, SR) - 440) < 3 and rms(mid) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)
    (tmp_path / "junk.m4a").write_bytes(b"junk" * 10)
    with pytest.raises(A.AudioError, match="not a readable audio file"):
        A.load_audio(tmp_path / "junk.m4a", SR)
