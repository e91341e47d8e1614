"""The prepare run (lora.dataprep.prepare, worker, ownership) is careful with the user's files: it
refuses before it deletes anything it did not make (input and output folders that overlap, a
damaged prepare_state.json), says when it changes audio or captions (overs above 0 dBFS, NaN
samples, channel mixing, CSV commas, repeated caption rows), reads what it can (symlinked
folders, broken links, unreadable folders) and never answers a user's mistake (a file as
--output_dir, a full disk, Ctrl-C) with a traceback. Wherever a case says nothing may change, the
sha1 of every file is checked."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lora import prepare_data
from lora.common import cli
from lora.common import files as common_files
from lora.common.cli import UserError
from lora.dataprep import audio as A
from lora.dataprep import ownership, worker
from lora.dataprep import prepare as prepare_run
from lora.dataset import load_metadata
from tests.helpers import ROOT, SR, music, prepare_report, sha1s


def songs(d: Path, n: int, seconds: float = 6, start: int = 0) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        sf.write(d / f"song{i}.wav", music(seconds, seed=i), SR)
    return d


def prep(inp, out, *extra) -> int:
    return prepare_data.main(["--input_dir", str(inp), "--output_dir", str(out), "--num_workers",
                              "1", *extra])


@pytest.fixture(autouse=True)
def fresh_log_handlers():
    """run_main attaches a stderr handler once; one attached under an earlier test's capsys would
    write to a closed stream. Each test starts without, and the handlers are restored after it."""
    saved = cli.log.handlers[:]
    cli.log.handlers.clear()
    yield
    cli.log.handlers[:] = saved


@pytest.fixture
def lora_log():
    """Records of the "lora" logger (it does not propagate to the root logger, so caplog misses
    it)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    h = Keep(level=logging.DEBUG)
    cli.log.addHandler(h)
    old = cli.log.level
    cli.log.setLevel(logging.INFO)
    yield records
    cli.log.removeHandler(h)
    cli.log.setLevel(old)


def messages(records, level=logging.WARNING) -> str:
    return "\n".join(r.getMessage() for r in records if r.levelno >= level)


# ---- 1. input and output folders that overlap ------------------------------------------------------
@pytest.mark.slow
def test_input_that_is_the_train_folder_of_the_output_is_refused_and_nothing_changes(tmp_path):
    """The command from the issue, as a user types it: before the fix it deleted the 8 example
    WAVs."""
    cmd = [sys.executable, str(ROOT / "lora" / "prepare_data.py")]
    r = subprocess.run(cmd + ["--create_example", "--output_dir", "exD", "--example_clips", "8"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    exd = tmp_path / "exD"
    before = sha1s(exd)
    assert sum(k.endswith(".wav") for k in before) == 8
    r = subprocess.run(cmd + ["--input_dir", "exD/train", "--output_dir", "exD"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = r.stderr
    assert str(exd / "train") in err and f"--output_dir {exd}" in err and "Nothing was changed" in err
    assert "another --output_dir" in err and "folder of their own" in err
    assert sha1s(exd) == before
    # inside train/ is the same overlap
    (exd / "train" / "sub").mkdir()
    with pytest.raises(UserError, match="lies inside"):
        prep(exd / "train" / "sub", exd)
    assert sha1s(exd) == before


def test_raw_audio_in_the_train_folder_is_refused_every_time(tmp_path):
    """Raw audio in ud/train, --input_dir ud/train --output_dir ud run twice: before the fix the
    second run took the first run's clips for new recordings."""
    ud = tmp_path / "ud"
    songs(ud / "train", 3)
    before = sha1s(ud)
    for _ in range(2):
        with pytest.raises(UserError) as e:
            prep(ud / "train", ud)
        assert str(ud / "train") in str(e.value) and "Nothing was changed" in str(e.value)
        assert sha1s(ud) == before and sorted(p.name for p in ud.iterdir()) == ["train"]
    # the parent as input: ud/train holds audio prepare_data did not write, which would be left out
    # silently
    with pytest.raises(UserError) as e:
        prep(ud, ud)
    assert f"{ud / 'train'} holds 3 audio file(s) that prepare_data did not write" in str(e.value)
    assert sha1s(ud) == before and sorted(p.name for p in ud.iterdir()) == ["train"]


def test_output_folder_in_the_input_holding_only_its_own_clips_is_fine(tmp_path):
    music_dir = songs(tmp_path / "music", 3)
    originals = sha1s(music_dir)
    for _ in range(2):  # data_dir == input_dir: its own train/ and valid/ clips are never scanned
        assert prep(music_dir, music_dir) == 0
        assert prepare_report(music_dir)["files_found"] == 3
    after = sha1s(music_dir)
    assert all(after[k] == v for k, v in originals.items())
    # a user's file among the clips
    sf.write(music_dir / "train" / "mine.wav", music(6, seed=9), SR)
    snapshot = sha1s(music_dir)
    with pytest.raises(UserError,
                       match=r"train holds 1 audio file\(s\) that prepare_data did not write "
                             r"\(e.g. mine"):
        prep(music_dir, music_dir)
    assert sha1s(music_dir) == snapshot


def test_files_prepare_data_writes_never_replace_files_it_reads(tmp_path):
    music_dir = songs(tmp_path / "music", 2)
    (music_dir / "metadata.jsonl").write_text(json.dumps({"file_name": "song0.wav", "text": "lofi"})
                                              + "\n")
    before = sha1s(music_dir)
    # --metadata_file would overwrite the captions
    with pytest.raises(UserError, match="is read as captions"):
        prep(music_dir, music_dir, "--metadata_file", "metadata.jsonl")
    # a user's file of the same name in the input folder
    (music_dir / "prepare_report.json").write_text("{}")
    before = sha1s(music_dir)
    with pytest.raises(UserError, match="prepare_data did not write"):
        prep(music_dir, music_dir, "--overwrite")
    assert sha1s(music_dir) == before
    out = tmp_path / "out"
    assert prep(music_dir, out) == 0
    with pytest.raises(UserError, match="is read as captions"):
        prep(music_dir, out, "--captions_file", str(out / "metadata.json"))


# ---- 2. and 3. captions files -------------------------------------------------------------------
def test_csv_caption_with_unquoted_commas_is_an_error_naming_every_line(tmp_path):
    music_dir = songs(tmp_path / "music", 3)
    before = sha1s(music_dir)
    caps = tmp_path / "caps.csv"
    caps.write_text("file_name,text\nsong0.wav,lofi hip hop, dusty drums, 80 "
                    "BPM\nsong1.wav,\"quoted, fine\"\nsong2.wav,dark synthwave, driving bass\n",
                    encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        prep(music_dir, out, "--captions_file", str(caps))
    msg = str(e.value)
    assert str(caps) in msg and "lines 2, 4" in msg and "double quotes" in msg
    assert not out.exists() or not any(out.iterdir())
    # header-less two-column file
    caps.write_text("song0.wav,lofi hip hop, dusty drums\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"line 1 has more than two fields"):
        prep(music_dir, out, "--captions_file", str(caps))
    # quoted, the whole caption is read (a quoted line break too)
    caps.write_text('file_name,text\nsong0.wav,"lofi hip hop, dusty drums, 80 '
                    'BPM"\nsong1.wav,"two\nlines, ok"\n', encoding="utf-8")
    assert prep(music_dir, out, "--captions_file", str(caps)) == 0
    text = {r.source: r.text for r in load_metadata(out)}
    assert text["song0.wav"] == "lofi hip hop, dusty drums, 80 BPM" and text["song1.wav"] == "two lines, ok"
    assert sha1s(music_dir) == before


@pytest.mark.parametrize("kind", ["csv", "jsonl", "json"])
def test_repeated_rows_with_different_captions_are_an_error(tmp_path, kind):
    music_dir = songs(tmp_path / "music", 2)
    rows = [("song0.wav", "lofi piano"), ("song1.wav", "techno"), ("song0.wav", "jazz trio")]
    caps = tmp_path / f"caps.{kind}"
    if kind == "csv":
        caps.write_text("file_name,text\n" + "".join(f"{f},{t}\n" for f, t in rows))
        where = "line 2: 'lofi piano'; line 4: 'jazz trio'"
    elif kind == "jsonl":
        caps.write_text("".join(json.dumps({"file_name": f, "text": t}) + "\n" for f, t in rows))
        where = "line 1: 'lofi piano'; line 3: 'jazz trio'"
    else:
        caps.write_text(json.dumps([{"file_name": f, "text": t} for f, t in rows]))
        where = "entry 0: 'lofi piano'; entry 2: 'jazz trio'"
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        prep(music_dir, out, "--captions_file", str(caps))
    assert str(caps) in str(e.value) and f"song0.wav: {where}" in str(e.value)
    assert not out.exists() or not any(out.iterdir())


def test_repeated_rows_with_the_same_caption_are_a_warning(tmp_path, lora_log):
    music_dir = songs(tmp_path / "music", 2)
    caps = tmp_path / "caps.csv"
    caps.write_text("file_name,text\nsong0.wav,lofi\nsong1.wav,techno\nsong0.wav,lofi\n")
    out = tmp_path / "out"
    assert prep(music_dir, out, "--captions_file", str(caps)) == 0
    assert "song0.wav (line 2, line 4)" in messages(lora_log)
    assert {r.source: r.text for r in load_metadata(out)} == {"song0.wav": "lofi", "song1.wav": "techno"}


# ---- 4. and 5. what decoding finds in the audio -------------------------------------------------------
def test_float_wav_above_full_scale_is_scaled_down_not_clipped(tmp_path):
    music_dir = tmp_path / "music"
    music_dir.mkdir()
    loud = music(8, seed=1, amp=1.8)
    peak = float(np.abs(loud).max())
    sf.write(music_dir / "loud.wav", loud, SR, subtype="FLOAT")
    sf.write(music_dir / "fine.wav", music(8, seed=2), SR, subtype="FLOAT")
    before = sha1s(music_dir)
    out = tmp_path / "out"
    assert prep(music_dir, out, "--valid_fraction", "0") == 0
    rep = prepare_report(out)
    assert rep["clips_scaled_down"] == 1
    assert {"file": "loud.wav",
            "warning": f"1 clip(s) peaked at up to +{20 * np.log10(peak):.1f} dBFS and were "
                                           f"scaled down to avoid clipping"} in rep["warnings"]
    clips = {r.source: r for r in load_metadata(out)}
    y, _ = sf.read(clips["loud.wav"].path, dtype="int16")
    # before: 62% of the samples at full scale
    assert np.mean(np.abs(y.astype(int)) >= 32767) < 1e-3
    start = int(round(clips["loud.wav"].offset * SR))
    np.testing.assert_allclose(y / 32768.0, loud[start:start + y.size] / peak, atol=2e-4)
    f, _ = sf.read(clips["fine.wav"].path, dtype="int16")  # a clip that fits is not touched
    start = int(round(clips["fine.wav"].offset * SR))
    np.testing.assert_array_equal(f, A.to_pcm16(music(8, seed=2)[None, start:start + f.size])[0])
    assert sha1s(music_dir) == before


def test_mp3_overs_take_the_same_path(tmp_path):
    music_dir = tmp_path / "music"
    music_dir.mkdir()
    t = np.arange(8 * 44100) / 44100
    # its mp3 overshoots 0 dBFS
    square = (0.99 * np.sign(np.sin(2 * np.pi * 220 * t))).astype(np.float32)
    sf.write(music_dir / "square.mp3", square, 44100)
    out = tmp_path / "out"
    assert prep(music_dir, out) == 0
    (r,) = load_metadata(out)
    y, _ = sf.read(r.path, dtype="int16")
    assert np.mean(np.abs(y.astype(int)) >= 32767) < 1e-3
    assert prepare_report(out)["clips_scaled_down"] == 1


def test_a_few_nan_samples_are_repaired_and_many_skip_the_file_as_damaged(tmp_path):
    music_dir = tmp_path / "music"
    music_dir.mkdir()
    one = music(8, 44100, seed=1)
    one[1000] = np.nan
    sf.write(music_dir / "one_nan.wav", one, 44100, subtype="FLOAT")
    many = music(8, 44100, seed=2)
    many[::7] = np.inf
    sf.write(music_dir / "many_nan.wav", many, 44100, subtype="FLOAT")
    sf.write(music_dir / "ok.wav", music(8, seed=3), SR)
    before = sha1s(music_dir)
    out = tmp_path / "out"
    assert prep(music_dir, out) == 0
    rep = prepare_report(out)
    clips = {r.source: r for r in load_metadata(out)}
    assert "one_nan.wav" in clips  # before: the whole file was skipped as "silent"
    y, _ = sf.read(clips["one_nan.wav"].path)
    assert np.isfinite(y).all() and 20 * np.log10(np.sqrt(np.mean(y ** 2))) > -30
    assert {"file": "one_nan.wav",
            "warning": f"1 NaN/inf sample(s) of {one.size} were replaced by 0 (silence); "
                                              f"the file is slightly damaged"} in rep["warnings"]
    assert rep["nonfinite_samples_repaired"] == 1
    bad = many.size - np.isfinite(many).sum()
    assert {"file": "many_nan.wav",
            "reason": f"{bad} of {many.size} samples are NaN/inf: the file is damaged"} \
        in rep["skipped"]
    assert not any("many-nan" in p.name for p in out.rglob("*.wav"))  # its clips were removed
    assert sha1s(music_dir) == before


def test_channel_mixing_is_reported(tmp_path, lora_log):
    music_dir = tmp_path / "music"
    music_dir.mkdir()
    sf.write(music_dir / "st.wav", music(6, seed=1, channels=2), SR)
    sf.write(music_dir / "mono.wav", music(6, seed=2), SR)
    assert prep(music_dir, tmp_path / "o1") == 0
    assert prepare_report(tmp_path / "o1")["channel_mix"] == {"channels": 1, "mixed_down": 1,
                                                               "mono_to_stereo": 0}
    assert "1 recording(s) with more than 1 channel(s) were mixed down to mono" in messages(lora_log, logging.INFO)
    assert prep(music_dir, tmp_path / "o2", "--channels", "2") == 0
    assert prepare_report(tmp_path / "o2")["channel_mix"] == {"channels": 2, "mixed_down": 0,
                                                               "mono_to_stereo": 1}
    assert "1 mono recording(s) were copied to both channels" in messages(lora_log, logging.INFO)


# ---- 6. and 7. symlinks and folders that cannot be read ------------------------------------------------
def test_symlinked_folders_are_followed_and_bad_links_are_reported(tmp_path):
    music_dir = songs(tmp_path / "music", 1)
    elsewhere = songs(tmp_path / "elsewhere", 1, start=1)
    (music_dir / "linked").symlink_to(elsewhere, target_is_directory=True)
    # the same folder twice: once
    (music_dir / "again").symlink_to(elsewhere, target_is_directory=True)
    (music_dir / "up").symlink_to(music_dir, target_is_directory=True)  # a loop
    (music_dir / "self.wav").symlink_to(music_dir / "self.wav")  # a link to itself
    (music_dir / "gone.wav").symlink_to(tmp_path / "missing.wav")  # dangling
    before = sha1s(music_dir) | sha1s(elsewhere)
    out = tmp_path / "out"
    assert prep(music_dir, out) == 0  # before: a traceback (FileNotFoundError)
    assert {r.source for r in load_metadata(out)} == {"song0.wav", "again/song1.wav"}
    skipped = {s["file"]: s["reason"] for s in prepare_report(out)["skipped"]}
    assert skipped["gone.wav"].startswith("broken symlink")
    assert skipped["self.wav"].startswith("symlink loop") and skipped["up"].startswith("symlink loop")
    assert prepare_report(out)["ignored_files"]["folders linked twice (scanned once)"] == 1
    assert sha1s(music_dir) | sha1s(elsewhere) == before


def _locked(monkeypatch, folder: Path):
    """os.scandir fails on ``folder`` as it does without read permission (tests run as root, which
    reads all)."""
    real = os.scandir

    def scandir(path="."):
        if os.path.realpath(path) == os.path.realpath(folder):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_unreadable_folder_is_reported_and_a_rerun_keeps_its_clips(tmp_path, monkeypatch, lora_log):
    music_dir = songs(tmp_path / "music", 2)
    songs(music_dir / "locked", 1, start=5)
    (music_dir / "locked" / "song5.txt").write_text("a caption from a sidecar")
    out = tmp_path / "out"
    assert prep(music_dir, out) == 0
    meta = (out / "metadata.json").read_bytes()
    clips = sha1s(out / "train") | sha1s(out / "valid")
    _locked(monkeypatch, music_dir / "locked")
    assert prep(music_dir, out) == 0  # before: its clips were removed as if the file were deleted
    assert (out / "metadata.json").read_bytes() == meta
    assert sha1s(out / "train") | sha1s(out / "valid") == clips
    rep = prepare_report(out)
    assert rep["unreadable"] == [{"path": "locked", "kind": "folder", "reason": "Permission denied",
                                  "earlier_sources_kept": 1}]
    assert any(w["file"] == "locked/song5.wav" and "cannot be read now" in w["warning"]
               for w in rep["warnings"])
    assert "cannot read folder" in messages(lora_log)
    # a first run: the folder is reported, not skipped without a word
    fresh = tmp_path / "fresh"
    assert prep(music_dir, fresh) == 0
    assert prepare_report(fresh)["unreadable"][0]["path"] == "locked" and len(load_metadata(fresh)) == 2


def test_source_that_cannot_be_opened_keeps_its_clips(tmp_path, monkeypatch):
    music_dir = songs(tmp_path / "music", 2)
    out = tmp_path / "out"
    assert prep(music_dir, out) == 0
    meta = (out / "metadata.json").read_bytes()
    os.utime(music_dir / "song1.wav", ns=(1, 1))  # changed on disk, so it would be decoded again

    def no_read(path, *a, **k):
        if Path(path).name == "song1.wav":
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *a, **k)

    monkeypatch.setattr(prepare_run, "open", no_read, raising=False)
    assert prep(music_dir, out) == 0
    assert (out / "metadata.json").read_bytes() == meta
    assert any(w["file"] == "song1.wav" and "cannot be read now (Permission denied)" in w["warning"]
               for w in prepare_report(out)["warnings"])
    assert prepare_report(out)["unreadable"] == [{"path": "song1.wav", "kind": "file",
                                                  "reason": "Permission denied",
                                                  "earlier_sources_kept": 1}]
    # a first run: the file is skipped with its reason and listed as unreadable
    real_hash = A.file_hash
    monkeypatch.setattr(A, "file_hash", lambda path: no_read(path) if Path(path).name == "song1.wav"
                        else real_hash(path))
    fresh = tmp_path / "fresh"
    assert prep(music_dir, fresh) == 0
    rep = prepare_report(fresh)
    assert rep["unreadable"] == [{"path": "song1.wav", "kind": "file", "reason": "Permission denied",
                                  "earlier_sources_kept": 0}]
    assert rep["skipped"][0]["file"] == "song1.wav" and "cannot read the file" in rep["skipped"][0]["reason"]


def test_broken_link_to_a_folder_of_an_earlier_run_keeps_its_clips(tmp_path):
    music_dir = songs(tmp_path / "music", 1)
    usb = songs(tmp_path / "usb", 1, start=3)
    (music_dir / "usb").symlink_to(usb, target_is_directory=True)
    out = tmp_path / "out"
    assert prep(music_dir, out) == 0
    meta = (out / "metadata.json").read_bytes()
    usb.rename(tmp_path / "unplugged")  # the drive is gone: the link dangles
    assert prep(music_dir, out) == 0
    assert (out / "metadata.json").read_bytes() == meta
    assert prepare_report(out)["skipped"][0]["file"] == "usb"


# ---- 8. a damaged prepare_state.json ---------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["{not json", "[1, 2]"])
def test_damaged_state_is_refused_unless_overwrite(tmp_path, damage):
    music_dir = songs(tmp_path / "music", 2)
    out = tmp_path / "out"
    assert prep(music_dir, out) == 0
    (out / ownership.STATE_FILE).write_text(damage)
    before = sha1s(out)
    with pytest.raises(UserError) as e:
        prep(music_dir, out)
    assert str(out
               / ownership.STATE_FILE) in str(e.value) and "damaged" in str(e.value) and "--overwrite" in str(e.value)
    assert sha1s(out) == before
    with pytest.raises(UserError, match="damaged"):
        prepare_data.main(["--create_example", "--output_dir", str(out)])
    assert sha1s(out) == before
    # the damaged state no longer says that captions.csv (the review table) is prepare_data's: it may
    # hold edits, so even --overwrite leaves it alone and says so; moved away, --overwrite prepares
    with pytest.raises(UserError, match="captions.csv was not written by prepare_data"):
        prep(music_dir, out, "--overwrite")
    assert sha1s(out) == before
    (out / "captions.csv").rename(tmp_path / "captions.csv")
    assert prep(music_dir, out, "--overwrite") == 0
    assert json.loads((out / ownership.STATE_FILE).read_text())["version"] == ownership.STATE_VERSION


# ---- 9. disk space ---------------------------------------------------------------------------------------
def test_free_space_is_checked_before_decoding(tmp_path, monkeypatch):
    music_dir = songs(tmp_path / "music", 3)
    out = tmp_path / "out"
    monkeypatch.setattr(common_files, "free_bytes", lambda path: 1000)
    with pytest.raises(UserError) as e:
        prep(music_dir, out)
    need = cli.human_bytes(3 * 6 * SR * 2)
    assert "Not enough free disk space" in str(e.value) and f"needs about {need}" in str(e.value)
    assert "3 file(s)" in str(e.value)
    assert not (out / "train").exists() and not (out / ownership.STATE_FILE).exists()
    monkeypatch.setattr(common_files, "free_bytes", lambda path: 3 * 6 * SR * 2 + 10_000)
    assert prep(music_dir, out) == 0


@pytest.mark.parametrize("small_disk", ["2m"], indirect=True)
def test_full_disk_keeps_finished_files_and_a_rerun_continues(tmp_path, monkeypatch, small_disk, capsys):
    # 8 x 10 clips of 64 KB on a 2 MB disk: full in file 4
    music_dir = songs(tmp_path / "music", 8, seconds=10)
    out = small_disk / "data"
    # let the pre-check pass: the disk fills up
    monkeypatch.setattr(common_files, "free_bytes", lambda path: 1 << 40)
    argv = ["--input_dir", str(music_dir), "--output_dir", str(out), "--num_workers", "1",
            "--segment_seconds", "1", "--min_seconds", "0.5"]
    assert cli.run_main(prepare_data.main, argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "The disk is full" in err and "No space left on device" in err
    state = json.loads((out / ownership.STATE_FILE).read_text())
    done = len(state["sources"])
    assert 1 <= done < 8 and f"Progress of {done} finished file(s) is saved in {out / ownership.STATE_FILE}" in err
    assert all((out / c["file"]).is_file() for s in state["sources"].values() for c in s["clips"])
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(
        # no half-made recording
        Path(c["file"]).name for s in state["sources"].values() for c in s["clips"])
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    assert cli.run_main(prepare_data.main, argv) == 0
    rep = prepare_report(out)
    assert rep["files_decoded"] == 8 - done and rep["files_reused"] == done
    assert len(load_metadata(out)) == 80


# ---- 10. output path checks ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["--create_example", "--input_dir"])
def test_existing_file_as_output_dir_is_a_message(tmp_path, capsys, mode):
    music_dir = songs(tmp_path / "music", 1)
    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    argv = [mode] + ([str(music_dir)] if mode == "--input_dir" else []) + ["--output_dir", str(target)]
    # before (--create_example): NotADirectoryError
    assert cli.run_main(prepare_data.main, argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{target} is a file, not a folder" in err
    assert target.read_text() == "my notes" and sorted(p.name
                                                       for p in tmp_path.iterdir()) == ["music",
                                                                                        "notes.txt"]


# ---- 11. Ctrl-C ----------------------------------------------------------------------------------------------
def test_ctrl_c_says_what_was_saved_and_how_to_continue(tmp_path, monkeypatch, capsys):
    music_dir = songs(tmp_path / "music", 4)
    out = tmp_path / "out"
    real = worker.process_file
    calls = []

    def stopped_on_third(job):
        calls.append(job["rel"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(worker, "process_file", stopped_on_third)
    assert cli.run_main(prepare_data.main,
                        ["--input_dir", str(music_dir), "--output_dir", str(out), "--num_workers",
                         "1"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"interrupted: progress of 2 finished file(s) is saved in "
                                            f"{out / ownership.STATE_FILE}; run the same command "
                                            f"again to continue: finished files are not decoded again")
    assert len(json.loads((out / ownership.STATE_FILE).read_text())["sources"]) == 2
    monkeypatch.setattr(worker, "process_file", real)
    assert prep(music_dir, out) == 0 and prepare_report(out)["files_decoded"] == 2
