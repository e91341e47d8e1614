"""lora/prepare_data.py end to end (with the modules it uses: lora/dataprep/captions.py,
lora/dataprep/example_data.py, lora/dataprep/data_check.py): the synthetic example set, preparing a
messy folder of real-world files, idempotent reruns, splits, captions, --validate, config
precedence, memory on long files, interrupted and overwritten runs.
What it does with the user's files: tests/dataprep/test_prepare_run.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lora import prepare_data
from lora.common.cli import UserError
from lora.common.fields import ConfigError
from lora.dataprep import audio as A
from lora.dataprep import example_data, prepare, worker
from lora.dataset import load_metadata
from tests.helpers import ROOT, SR, music, prepare_report


def tree_hashes(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory) -> Path:
    """A folder like a user's: formats, rates, depths, channels, sidecars, junk and edge cases."""
    d = tmp_path_factory.mktemp("audio_in")
    (d / "album" / "disc 1").mkdir(parents=True)
    sf.write(d / "album" / "disc 1" / "long take.flac", music(75, 44100, 1, channels=2), 44100,
             subtype="PCM_24")
    sf.write(d / "album" / "song2.mp3", music(12, 48000, 2, channels=2), 48000)
    sf.write(d / "loop.ogg", music(8, 22050, 3), 22050)
    sf.write(d / "voice.opus", music(7, 48000, 4), 48000, format="OGG", subtype="OPUS")
    sf.write(d / "old.aiff", music(6, 8000, 5), 8000, subtype="PCM_S8")
    sf.write(d / "hires.wav", music(9, 96000, 6), 96000, subtype="FLOAT")
    sf.write(d / "u8.wav", music(6, 22050, 7), 22050, subtype="PCM_U8")
    sf.write(d / "surround.wav", music(7, 48000, 8, channels=6), 48000, subtype="PCM_24")
    sf.write(d / "tail62.wav", music(62, 16000, 9), 16000)
    y = np.concatenate([np.zeros(3 * 16000), music(10, 16000, 10),
                        np.zeros(4 * 16000)]).astype(np.float32)
    sf.write(d / "padded.wav", y, 16000)
    sf.write(d / "Café 音楽 ♪.wav", music(6, 44100, 11), 44100)
    (d / "Café 音楽 ♪.txt").write_text("ambient café music, 温かい piano ♪", encoding="utf-8")
    (d / "album"
     / "song2.json").write_text(json.dumps({"genre": "synthwave", "moods": ["dark", "driving"],
                                                        "bpm": 110}), encoding="utf-8")
    sf.write(d / "copy_a.wav", music(6, 32000, 12), 32000)
    (d / "copy_b.wav").write_bytes((d / "copy_a.wav").read_bytes())
    sf.write(d / "tiny.wav", music(0.1, 44100, 13), 44100)
    sf.write(d / "silent.wav", np.zeros(10 * 44100, np.float32), 44100)
    sf.write(d / "truncated.flac", music(12, 44100, 14), 44100)
    data = (d / "truncated.flac").read_bytes()
    (d / "truncated.flac").write_bytes(data[: len(data) // 2])
    (d / "notes.wav").write_text("not audio at all")
    (d / "phone.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A junk")
    (d / "README.md").write_text("my music")
    return d


@pytest.fixture(scope="module")
def prepared(messy_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "data"
    before = tree_hashes(messy_folder)
    rc = prepare_data.main(["--input_dir", str(messy_folder), "--output_dir", str(out),
                            "--num_workers", "2",
                 "--valid_fraction", "0.25", "--config", str(ROOT / "config.yaml")])
    assert rc == 0
    return out, before


# ---- --input_dir ------------------------------------------------------------------------------
@pytest.mark.slow
def test_prepared_clips_are_32k_mono_pcm16(prepared):
    out, _ = prepared
    recs = load_metadata(out)
    assert recs
    doc = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    assert doc["sample_rate"] == SR and doc["channels"] == 1
    for r in recs:
        info = sf.info(str(r.path))
        assert (info.samplerate, info.channels, info.subtype) == (SR, 1, "PCM_16")
        assert info.frames / SR == pytest.approx(r.duration, abs=1e-3)
        assert 5.0 <= r.duration <= 30.0
        assert r.path.parent.name == r.split
    used = {r.source for r in recs}
    for f in ("album/song2.mp3", "loop.ogg", "voice.opus", "old.aiff", "hires.wav", "u8.wav",
              "surround.wav", "album/disc 1/long take.flac", "Café 音楽 ♪.wav"):
        assert f in used, f


@pytest.mark.slow
def test_long_files_are_cut_never_dropped_and_tails_are_counted(prepared):
    out, _ = prepared
    recs = load_metadata(out)
    long = sorted((r.offset, r.duration) for r in recs if r.source == "album/disc 1/long take.flac")
    assert [d for _, d in long] == pytest.approx([30.0, 30.0, 15.0], abs=0.01)
    assert [o for o, _ in long] == pytest.approx([0.0, 30.0, 60.0], abs=0.01)
    tail = [r.duration for r in recs if r.source == "tail62.wav"]
    assert tail == pytest.approx([30.0, 30.0], abs=0.01)
    rep = prepare_report(out)
    assert {"file": "tail62.wav", "seconds": pytest.approx(2.0, abs=0.01)} in rep["tails_dropped"]
    assert "tail62.wav" not in {s["file"] for s in rep["skipped"]}


@pytest.mark.slow
def test_silence_is_trimmed(prepared):
    out, _ = prepared
    (r,) = [r for r in load_metadata(out) if r.source == "padded.wav"]
    assert r.offset == pytest.approx(3.0, abs=0.01) and r.duration == pytest.approx(10.0, abs=0.01)


@pytest.mark.slow
def test_bad_files_are_skipped_and_reported_with_reasons(prepared):
    out, _ = prepared
    skipped = {s["file"]: s["reason"] for s in prepare_report(out)["skipped"]}
    assert "too short" in skipped["tiny.wav"]
    assert "silent" in skipped["silent.wav"]
    assert "not a readable audio file" in skipped["notes.wav"]
    assert "truncated" in skipped["truncated.flac"]
    try:
        import av  # noqa: F401
        # PyAV installed: the junk is reported
        assert "not a readable audio file" in skipped["phone.m4a"]
    except ImportError:
        assert "pip install av" in skipped["phone.m4a"] and "install.sh --extras" in skipped["phone.m4a"]
    assert set(skipped) == {"tiny.wav", "silent.wav", "notes.wav", "truncated.flac", "phone.m4a"}
    assert prepare_report(out)["ignored_files"].get(".md") == 1


@pytest.mark.slow
def test_duplicates_are_kept_once(prepared):
    out, _ = prepared
    rep = prepare_report(out)
    assert {"file": "copy_b.wav", "same_as": "copy_a.wav", "kind": "identical file"} in rep["duplicates"]
    sources = [r.source for r in load_metadata(out)]
    assert "copy_a.wav" in sources and "copy_b.wav" not in sources


@pytest.mark.slow
def test_captions_unicode_sidecars_and_template(prepared):
    out, _ = prepared
    text = {r.source: r.text for r in load_metadata(out)}
    assert text["Café 音楽 ♪.wav"] == "ambient café music, 温かい piano ♪"
    assert text["album/song2.mp3"] == "synthwave, dark, driving, 110 BPM"
    assert text["loop.ogg"] == "loop"  # caption_template {stem}
    rep = prepare_report(out)
    assert rep["caption_sources"]["sidecar"] == 2 and rep["caption_sources"]["template"] >= 5


@pytest.mark.slow
def test_split_is_by_recording_without_leakage(prepared):
    out, _ = prepared
    recs = load_metadata(out)
    train = {r.source for r in recs if r.split == "train"}
    valid = {r.source for r in recs if r.split == "valid"}
    assert train and valid and not (train & valid)
    assert len(valid) == round(0.25 * len(train | valid))
    # deterministic: the same rule gives the same split
    assert prepare._split(sorted(train | valid), 0.25, 1234) == valid


@pytest.mark.slow
def test_input_folder_is_never_changed(prepared, messy_folder):
    out, before = prepared
    assert tree_hashes(messy_folder) == before


@pytest.mark.slow
def test_rerun_does_no_decoding_and_gives_identical_metadata(prepared, messy_folder, monkeypatch):
    out, before = prepared
    meta = (out / "metadata.json").read_bytes()
    clips = tree_hashes(out / "train") | tree_hashes(out / "valid")

    def no_decoding(*a, **k):
        raise AssertionError("a rerun must not decode unchanged files")

    monkeypatch.setattr(A, "iter_audio", no_decoding)
    assert prepare_data.main(["--input_dir", str(messy_folder), "--output_dir", str(out),
                              "--num_workers", "1",
                   "--valid_fraction", "0.25"]) == 0
    assert (out / "metadata.json").read_bytes() == meta
    assert tree_hashes(out / "train") | tree_hashes(out / "valid") == clips
    rep = prepare_report(out)
    assert rep["files_decoded"] == 0 and rep["files_reused"] == rep["files_found"]
    assert len(rep["skipped"]) == 5  # still reported on a rerun
    assert tree_hashes(messy_folder) == before


@pytest.mark.slow
def test_validate_summary_and_exit_codes(prepared, tmp_path, capsys):
    out, _ = prepared
    assert prepare_data.main(["--validate", "--data_dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train:" in text and "valid:" in text and "clip durations" in text and "Data check: OK" in text
    assert "25-30" in text and "caption words" in text
    # break a copy: one clip missing, one with a wrong duration, one empty caption
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    doc = json.loads((bad / "metadata.json").read_text(encoding="utf-8"))
    doc["clips"][0]["duration"] += 3
    doc["clips"][1]["text"] = ""
    (bad / doc["clips"][2]["audio"]).unlink()
    (bad / "metadata.json").write_text(json.dumps(doc), encoding="utf-8")
    assert prepare_data.main(["--validate", "--data_dir", str(bad)]) == 1
    text = capsys.readouterr().out
    assert "PROBLEMS (2)" in text and "file missing" in text and "metadata says" in text
    assert "empty caption" in text


# ---- captions sources, enrichment, stereo ---------------------------------------------------------
def test_captions_file_audiofolder_and_default_text(tmp_path):
    d = tmp_path / "in"
    (d / "a").mkdir(parents=True)
    for name, seed in (("a/one.wav", 1), ("two.flac", 2), ("three.wav", 3), ("four.wav", 4)):
        sf.write(d / name, music(6, 32000, seed), 32000)
    caps = tmp_path / "caps.csv"
    caps.write_text("file_name,text\na/one.wav,\"lofi piano, 80 BPM\"\nmissing.wav,nothing\n",
                    encoding="utf-8")
    (d / "metadata.jsonl").write_text(json.dumps({"file_name": "two.flac",
                                                  "text": "dub techno chords"}) + "\n",
                                      encoding="utf-8")
    out = tmp_path / "out"
    assert prepare_data.main(["--input_dir", str(d), "--output_dir", str(out), "--captions_file",
                              str(caps),
                   "--default_text", "house groove", "--num_workers", "1"]) == 0
    text = {r.source: r.text for r in load_metadata(out)}
    assert text == {"a/one.wav": "lofi piano, 80 BPM", "two.flac": "dub techno chords",
                    "three.wav": "house groove", "four.wav": "house groove"}
    assert prepare_report(out)["unused_caption_entries"] == ["captions_file: missing.wav"]


def test_missing_caption_is_reported(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    sf.write(d / "x.wav", music(6, 32000, 1), 32000)
    sf.write(d / "y.wav", music(6, 32000, 2), 32000)
    (d / "y.txt").write_text("a caption")
    out = tmp_path / "out"
    assert prepare_data.main(["--input_dir", str(d), "--output_dir", str(out), "--caption_template",
                              "", "--num_workers", "1"]) == 0
    assert prepare_report(out)["uncaptioned"] == ["x.wav"]
    assert {r.source: r.text for r in load_metadata(out)} == {"x.wav": "", "y.wav": "a caption"}


@pytest.mark.slow
def test_enrich_captions_appends_tempo_and_key(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    sr = 22050
    y = np.zeros(sr * 8, np.float32)
    t = np.arange(int(0.05 * sr)) / sr
    click = (np.sin(2 * np.pi * 880 * t) * np.exp(-t * 60)).astype(np.float32)
    for k in range(16):
        y[int(k * 0.5 * sr):int(k * 0.5 * sr) + click.size] += click
    sf.write(d / "beat.wav", y, sr)
    (d / "beat.txt").write_text("click track")
    out = tmp_path / "out"
    assert prepare_data.main(["--input_dir", str(d), "--output_dir", str(out), "--enrich_captions",
                              "--num_workers", "1"]) == 0
    (r,) = load_metadata(out)
    head, bpm, key = r.text.split(", ")
    assert head == "click track" and bpm.endswith(" BPM") and abs(float(bpm.split()[0]) - 120) <= 4
    assert key.endswith(("major", "minor"))


def test_m4a_without_pyav_is_skipped_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    d = tmp_path / "in"
    d.mkdir()
    sf.write(d / "ok.wav", music(6, 32000, 1), 32000)
    (d / "phone.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A junk")
    out = tmp_path / "out"
    assert prepare_data.main(["--input_dir", str(d), "--output_dir", str(out), "--num_workers", "1"]) == 0
    (reason,) = [s["reason"] for s in prepare_report(out)["skipped"] if s["file"] == "phone.m4a"]
    assert "pip install av" in reason and "bash install.sh --extras" in reason


def test_stereo_output_keeps_two_channels(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    sf.write(d / "st.wav", music(6, 44100, 1, channels=2), 44100)
    sf.write(d / "mono.wav", music(6, 44100, 2), 44100)
    out = tmp_path / "out"
    assert prepare_data.main(["--input_dir", str(d), "--output_dir", str(out), "--channels", "2",
                              "--num_workers", "1"]) == 0
    for r in load_metadata(out):
        y, sr = sf.read(r.path)
        assert y.shape[1] == 2 and sr == SR
        if r.source == "mono.wav":
            np.testing.assert_array_equal(y[:, 0], y[:, 1])
        else:
            assert not np.allclose(y[:, 0], y[:, 1])


def test_output_inside_input_is_not_scanned_and_refuses_foreign_metadata(tmp_path):
    d = tmp_path / "music"
    d.mkdir()
    for i in range(3):
        sf.write(d / f"s{i}.wav", music(6, 32000, i), 32000)
    out = d / "prepared"
    for _ in range(2):
        assert prepare_data.main(["--input_dir", str(d), "--output_dir", str(out), "--num_workers",
                                  "1"]) == 0
        assert prepare_report(out)["files_found"] == 3
    other = tmp_path / "other"
    other.mkdir()
    (other / "metadata.json").write_text("[]")
    with pytest.raises(UserError, match="--overwrite"):
        prepare_data.main(["--input_dir", str(d), "--output_dir", str(other)])
    # an example dataset never replaces a prepared one without --overwrite
    with pytest.raises(UserError, match="--overwrite"):
        prepare_data.main(["--create_example", "--output_dir", str(out)])


def _peak_memory_of_prepare(tmp_path, minutes: int) -> tuple[int, Path]:
    d = tmp_path / f"in{minutes}"
    d.mkdir()
    sr = 8000
    with sf.SoundFile(d / "long.wav", "w", sr, 1, subtype="PCM_16") as f:  # written block-wise
        for k in range(minutes):
            f.write(music(60, sr, k))
    out = tmp_path / f"out{minutes}"
    tracemalloc.start()
    try:
        assert prepare_data.main(["--input_dir", str(d), "--output_dir", str(out), "--num_workers", "1",
                       "--trim_silence", "false"]) == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, out


@pytest.mark.slow
def test_long_file_memory_stays_bounded(tmp_path):
    peak2, _ = _peak_memory_of_prepare(tmp_path, 2)
    peak20, out = _peak_memory_of_prepare(tmp_path, 20)
    full = 20 * 60 * SR * 4  # the whole 20-minute file as float32 at 32 kHz: 154 MB
    assert peak20 < full / 4, f"peak {peak20 / 1e6:.1f} MB"
    # bounded: ten times the audio needs about the same memory
    assert peak20 < 1.3 * peak2 + 2e6, f"2 min: {peak2 / 1e6:.1f} MB, 20 min: {peak20 / 1e6:.1f} MB"
    recs = load_metadata(out)
    assert len(recs) == 40 and sum(r.duration for r in recs) == pytest.approx(1200, abs=0.01)


# ---- --create_example -------------------------------------------------------------------------
def test_example_dataset(example_data_dir, tmp_path):
    recs = load_metadata(example_data_dir)
    assert len(recs) == 16 and all(r.duration == pytest.approx(4.0) for r in recs)
    styles = {s: {r.split for r in recs if f"_{s}_" in r.id} for s in example_data.STYLES}
    assert all(v == {"train", "valid"} for v in styles.values()), styles
    assert all("BPM" in r.text for r in recs)
    # no two alike
    assert len({hashlib.sha1(r.path.read_bytes()).hexdigest() for r in recs}) == len(recs)
    tonal = [r for r in recs if "drums" not in r.id]
    assert all(r.text.endswith(("major", "minor")) for r in tonal)
    # deterministic: a second build is identical, byte for byte
    again = tmp_path / "again"
    assert prepare_data.main(["--create_example", "--output_dir", str(again), "--example_clips", "16",
                   "--example_seconds", "4"]) == 0
    assert tree_hashes(again / "train") == {k: (v[0], tree_hashes(again / "train")[k][1])
                                            for k, v in tree_hashes(example_data_dir / "train").items()}
    assert (again / "metadata.json").read_text() == (example_data_dir / "metadata.json").read_text()


def test_example_styles_are_clearly_different(example_data_dir):
    def centroid(r):
        y, sr = sf.read(r.path)
        s = np.abs(np.fft.rfft(y))
        return (s * np.fft.rfftfreq(y.size, 1 / sr)).sum() / s.sum()

    recs = load_metadata(example_data_dir)
    by = {s: [centroid(r) for r in recs if f"_{s}_" in r.id] for s in example_data.STYLES}
    # drums are bright noise, pads and bass are dark, arpeggios in between
    assert min(by["techno_drums"]) > 2 * max(by["synth_arpeggio"] + by["funk_bass"] + by["ambient_pad"])
    assert min(by["synth_arpeggio"]) > 1.5 * max(by["funk_bass"] + by["ambient_pad"])


# ---- config and command line ------------------------------------------------------------------
def test_yaml_then_flags_precedence_and_unknown_keys(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    sf.write(d / "a.wav", music(25, 32000, 1), 32000)
    cfg = tmp_path / "my.yaml"
    cfg.write_text("data:\n  segment_seconds: 10\n  min_seconds: 2\n  num_workers: 1\n")
    out = tmp_path / "o1"
    assert prepare_data.main(["--config", str(cfg), "--input_dir", str(d), "--output_dir", str(out)]) == 0
    assert [r.duration for r in load_metadata(out)] == pytest.approx([10, 10, 5], abs=0.01)
    out2 = tmp_path / "o2"
    assert prepare_data.main(["--config", str(cfg), "--input_dir", str(d), "--output_dir", str(out2),
                   "--segment_seconds", "20"]) == 0
    assert [r.duration for r in load_metadata(out2)] == pytest.approx([20, 5], abs=0.01)
    cfg.write_text("data:\n  segment_second: 10\n")
    with pytest.raises(ConfigError, match="segment_seconds"):
        prepare_data.main(["--config", str(cfg), "--input_dir", str(d), "--output_dir", str(out)])
    with pytest.raises(ConfigError, match="--segment_seconds"):
        prepare_data.main(["--input_dir", str(d), "--output_dir", str(out), "--segment_second", "5"])
    with pytest.raises(ConfigError) as e:
        prepare_data.main(["--input_dir", str(tmp_path / "nope"), "--output_dir", str(out),
                           "--valid_fraction", "1.5"])
    assert "nope" in str(e.value) and "valid_fraction" in str(e.value)
    with pytest.raises(ConfigError, match="--create_example"):
        prepare_data.main(["--output_dir", str(out)])


@pytest.mark.slow
def test_seed_commands_from_inside_lora(tmp_path, monkeypatch):
    """The seed's commands, run from lora/ with relative paths, in-process and as a real
    subprocess."""
    d = tmp_path / "audio"
    d.mkdir()
    for i in range(2):
        sf.write(d / f"t{i}.wav", music(6, 44100, i), 44100)
    lora_dir = ROOT / "lora"
    monkeypatch.chdir(lora_dir)
    rel_in = os.path.relpath(d, lora_dir)
    rel_out = os.path.relpath(tmp_path / "data", lora_dir)
    assert prepare_data.main(["--input_dir", rel_in, "--output_dir", rel_out, "--metadata_file",
                              "metadata.json",
                   "--num_workers", "1"]) == 0
    recs = load_metadata(tmp_path / "data")
    assert len(recs) == 2 and {r.split for r in recs} == {"train", "valid"}  # >= 1 valid recording
    ex = os.path.relpath(tmp_path / "example", lora_dir)
    r = subprocess.run([sys.executable, "prepare_data.py", "--create_example", "--output_dir", ex,
                        "--example_clips", "8", "--example_seconds", "1"], cwd=lora_dir,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(load_metadata(tmp_path / "example")) == 8
    r = subprocess.run([sys.executable, "prepare_data.py", "--input_dir", "/does/not/exist"],
                       cwd=lora_dir, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "/does/not/exist" in r.stderr


def test_interrupted_run_resumes_without_redoing_finished_files(tmp_path, monkeypatch):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(4):
        sf.write(d / f"s{i}.wav", music(6, 32000, i), 32000)
    fresh = tmp_path / "fresh"
    assert prepare_data.main(["--input_dir", str(d), "--output_dir", str(fresh), "--num_workers",
                              "1"]) == 0

    real = worker.process_file
    calls = []

    def dies_on_third(job):
        calls.append(job["rel"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(job)

    # progress is saved when the run is interrupted
    monkeypatch.setattr(worker, "process_file", dies_on_third)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_data.main(["--input_dir", str(d), "--output_dir", str(out), "--num_workers", "1"])
    assert not (out / "metadata.json").exists()  # nothing that looks complete
    monkeypatch.setattr(worker, "process_file", real)
    assert prepare_data.main(["--input_dir", str(d), "--output_dir", str(out), "--num_workers", "1"]) == 0
    assert prepare_report(out)["files_decoded"] == 2 and prepare_report(out)["files_reused"] == 2
    assert (out / "metadata.json").read_text() == (fresh / "metadata.json").read_text()


def test_overwrite_redoes_everything(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(2):
        sf.write(d / f"s{i}.wav", music(6, 32000, i), 32000)
    out = tmp_path / "out"
    assert prepare_data.main(["--input_dir", str(d), "--output_dir", str(out), "--num_workers", "1"]) == 0
    assert prepare_data.main(["--input_dir", str(d), "--output_dir", str(out), "--num_workers", "1",
                              "--overwrite"]) == 0
    assert prepare_report(out)["files_decoded"] == 2
