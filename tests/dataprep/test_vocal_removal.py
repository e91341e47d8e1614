"""prepare_data --separate (lora/dataprep/vocal_removal.py) on a folder of songs: each source is
separated once and cached (a rerun, and a run with other clip settings, separate nothing), an
interrupted run resumes, ``auto`` leaves an instrumental untouched, the report lists what was
removed, the sources are never changed, bad values are messages.

Without demucs these tests skip, except with CI=true, where they fail.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.helpers import require_demucs

require_demucs()  # (skips without demucs; fails with CI=true: .ci/run installs it)

from tests.conftest import write_songs  # noqa: E402

# every test here runs prepare_data.py's main (end to end)
pytestmark = pytest.mark.slow

from lora import prepare_data  # noqa: E402
from lora.common.cli import Interrupted, UserError  # noqa: E402
from lora.common.fields import ConfigError  # noqa: E402
from lora.dataprep import audio as A  # noqa: E402
from lora.dataprep import separation as S  # noqa: E402


@pytest.fixture(scope="module")
def seps(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seps")
    return {"random": S.random_separator(root / "random"),
            "muted": S.random_separator(root / "muted", mute_vocals=True)}


@pytest.fixture
def songs(tmp_path) -> Path:
    write_songs(tmp_path / "songs", n=3, seconds=5.0)
    return tmp_path / "songs"


def _run(songs: Path, data: Path, *extra) -> dict:
    assert prepare_data.main(["--input_dir", str(songs), "--output_dir", str(data), "--min_seconds", "2",
                              "--segment_seconds", "4", "--num_workers", "1", *extra]) == 0
    return json.loads((data / "prepare_report.json").read_text())


def _clips(data: Path) -> dict[str, str]:
    """{clip: sha1 of its bytes}."""
    doc = json.loads((data / "metadata.json").read_text())
    return {c["audio"]: A.file_hash(data / c["audio"]) for c in doc["clips"]}


def _sources(songs: Path) -> dict:
    return {p.name: (A.file_hash(p), p.stat().st_mtime_ns) for p in sorted(songs.iterdir())}


def test_each_source_is_separated_once_and_the_report_says_what_was_removed(songs, tmp_path, seps,
                                                                           monkeypatch):
    before = _sources(songs)
    data = tmp_path / "data"
    calls = []
    real = S.separate_file
    monkeypatch.setattr(S, "separate_file", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    report = _run(songs, data, "--separate", "vocals", "--separation_model", str(seps["random"]))
    sep = report["separation"]
    assert len(calls) == 3 and sep["separated_now"] == 3 and sep["from_cache"] == 0
    assert [f["file"] for f in sep["files"]] == ["song_0.wav", "song_1.wav", "song_2.wav"]
    for f in sep["files"]:
        assert f["used"] == "instrumental" and -60 < f["vocals_db"] < 0 and f["vocal_energy_percent"] > 0
    assert len(list((data / "cache" / "separation").glob("*.wav"))) == 3
    separated = _clips(data)
    plain = _clips(Path(_run(songs, tmp_path / "plain")["data_dir"]))
    # the same clips by name (an instrumental trimmed of a quiet end may give one tail fewer), each
    # cut from the instrumental, not from the source
    assert separated and set(separated) <= set(plain) and all(separated[k] != plain[k] for k in separated)
    assert {k.rsplit("_", 1)[0] for k in separated} == {k.rsplit("_", 1)[0] for k in plain}

    calls.clear()
    again = _run(songs, data, "--separate", "vocals", "--separation_model", str(seps["random"]))
    assert calls == [] and again["files_decoded"] == 0 and _clips(data) == separated
    # other clip settings decode every source again, from the cached instrumentals
    other = _run(songs, data, "--separate", "vocals", "--separation_model", str(seps["random"]),
                 "--trim_silence", "false")
    assert calls == [] and other["files_decoded"] == 3
    assert other["separation"]["separated_now"] == 0 and other["separation"]["from_cache"] == 3
    assert _sources(songs) == before  # the user's files are never changed


def test_an_interrupted_separation_resumes_where_it_stopped(songs, tmp_path, seps, monkeypatch):
    data = tmp_path / "data"
    calls = []
    real = S.separate_file

    def stop_at_second(*a, **k):
        calls.append(a[1].name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(S, "separate_file", stop_at_second)
    with pytest.raises(Interrupted, match="1 recording.s. separated so far are kept"):
        _run(songs, data, "--separate", "vocals", "--separation_model", str(seps["random"]))
    assert len(list((data / "cache" / "separation").glob("*.json"))) == 1
    assert not list((data / "cache" / "separation").glob(".*"))  # no half-written file left
    calls.clear()
    monkeypatch.setattr(S, "separate_file", lambda *a, **k: calls.append(a[1].name) or real(*a, **k))
    report = _run(songs, data, "--separate", "vocals", "--separation_model", str(seps["random"]))
    assert calls == ["song_1.wav", "song_2.wav"]
    assert report["separation"]["from_cache"] == 1 and report["separation"]["separated_now"] == 2


def test_auto_leaves_an_instrumental_untouched_and_separates_a_song_with_vocals(songs, tmp_path, seps):
    plain = _clips(Path(_run(songs, tmp_path / "plain")["data_dir"]))
    # a model that hears no vocals: every recording is instrumental, decoded from the source itself
    report = _run(songs, tmp_path / "muted", "--separate", "auto", "--separation_model", str(seps["muted"]))
    assert [f["used"] for f in report["separation"]["files"]] == ["original"] * 3
    assert all(f["vocals_db"] < -40 for f in report["separation"]["files"])
    assert _clips(tmp_path / "muted") == plain  # bit for bit
    # the random model's vocal stem sits near -12 dB: above a -30 dB threshold (separated), below
    # -3 dB (kept as is)
    report = _run(songs, tmp_path / "low", "--separate", "auto", "--separation_model", str(seps["random"]),
                  "--vocal_threshold_db", "-30")
    assert [f["used"] for f in report["separation"]["files"]] == ["instrumental"] * 3
    assert all(v != plain[k] for k, v in _clips(tmp_path / "low").items())
    report = _run(songs, tmp_path / "default", "--separate", "auto", "--separation_model",
                  str(seps["random"]), "--vocal_threshold_db", "-3")
    assert [f["used"] for f in report["separation"]["files"]] == ["original"] * 3
    assert _clips(tmp_path / "default") == plain


@pytest.mark.parametrize("argv,message", [
    (["--separate", "karaoke"], "--separate"),
    (["--separate", "auto", "--vocal_threshold_db", "5"], "data.vocal_threshold_db"),
    (["--separate", "vocals", "--separation_model", "/no/such/model"], "no such folder"),
    (["--separate", "vocals", "--separation_device", "tpu"], "--separation_device"),
    pytest.param(["--separate", "vocals", "--separation_device", "cuda"], "no CUDA GPU is visible",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="has a GPU")),
])
def test_bad_separation_values_are_messages(songs, tmp_path, argv, message):
    with pytest.raises((ConfigError, UserError), match=message):
        _run(songs, tmp_path / "data", *argv)
    assert not (tmp_path / "data").exists()


def test_missing_demucs_names_the_install_option(songs, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "demucs" else real(name, *a))
    with pytest.raises(ConfigError, match="bash install.sh --separation"):
        _run(songs, tmp_path / "data", "--separate", "vocals")


def test_a_recording_that_cannot_be_separated_is_skipped_not_kept_with_its_vocals(songs, tmp_path, seps,
                                                                                  monkeypatch):
    real = S.separate_file

    def fail_on_song_1(sep, src, *a, **k):
        if src.name == "song_1.wav":
            raise A.AudioError(f"{src}: decoding failed at 2.0 s (a damaged file)")
        return real(sep, src, *a, **k)

    monkeypatch.setattr(S, "separate_file", fail_on_song_1)
    report = _run(songs, tmp_path / "data", "--separate", "vocals", "--separation_model", str(seps["random"]))
    assert report["skipped"] == [{"file": "song_1.wav", "reason": "cannot be separated (decoding failed at "
                                  "2.0 s (a damaged file))"}]
    sources = {c["source"] for c in json.loads((tmp_path / "data" / "metadata.json").read_text())["clips"]}
    assert sources == {"song_0.wav", "song_2.wav"}
