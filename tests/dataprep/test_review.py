"""Edits round-trip (lora/dataprep/review.py): prepare_data writes captions.csv; the user edits it
in a spreadsheet; ``prepare_data --data_dir DATA --captions_file DATA/captions.csv`` changes only
the edited captions in metadata.json, decodes no audio, and the next training's token cache encodes
only the changed captions. A rerun of prepare keeps the edits; unapplied edits are never
overwritten; bad tables are messages; the trigger word is recorded and applied.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from lora import prepare_data
from lora.common.cli import UserError
from lora.dataprep import audio as A
from lora.dataprep import review
from lora.dataset import apply_trigger, load_metadata
from tests.conftest import write_songs

# every test here runs prepare_data.py's main (end to end)
pytestmark = pytest.mark.slow


@pytest.fixture
def prepared(tmp_path) -> tuple[Path, Path]:
    songs = tmp_path / "songs"
    write_songs(songs, n=3, seconds=5.0, sample_rate=32000, channels=1)
    for i in range(3):
        (songs / f"song_{i}.txt").write_text(f"caption of song {i}")
    data = tmp_path / "data"
    assert prepare_data.main(["--input_dir", str(songs), "--output_dir", str(data), "--min_seconds", "2",
                              "--segment_seconds", "3", "--num_workers", "1"]) == 0
    return songs, data


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"))))


def _write_rows(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


def _no_audio(monkeypatch):
    """Any attempt to open audio fails the test."""
    import soundfile

    def boom(*a, **k):
        raise AssertionError("audio was decoded")

    for mod, name in ((soundfile, "SoundFile"), (soundfile, "read"), (soundfile, "info"),
                      (A, "iter_audio"), (A, "audio_info"), (A, "load_audio")):
        monkeypatch.setattr(mod, name, boom)


def test_captions_csv_lists_every_clip(prepared):
    _, data = prepared
    doc = json.loads((data / "metadata.json").read_text())
    rows = _rows(data / "captions.csv")
    assert list(rows[0]) == list(review.COLUMNS)
    assert [r["clip"] for r in rows] == [c["audio"] for c in doc["clips"]]
    assert [r["caption"] for r in rows] == [c["text"] for c in doc["clips"]]
    assert {r["caption_source"] for r in rows} == {"sidecar"}


def test_an_edit_changes_only_that_caption_decodes_no_audio_and_reencodes_only_that_text(
        prepared, tiny_model_dir, monkeypatch):
    from lora.config import ModelConfig
    from lora.dataprep.token_cache import build_token_cache
    from lora.modeling.loading import load_base_model

    _, data = prepared
    model, processor, info = load_base_model(ModelConfig(model_path=str(tiny_model_dir)))
    _, stats = build_token_cache(load_metadata(data), model, processor, info, data, show_progress=False)
    before = json.loads((data / "metadata.json").read_text())
    rows = _rows(data / "captions.csv")
    rows[1]["caption"] = "lofi piano, dusty drums, 80 BPM"  # the one edit (quoted: it holds commas)
    _write_rows(data / "captions.csv", rows)
    with monkeypatch.context() as m:
        _no_audio(m)
        assert prepare_data.main(["--data_dir", str(data), "--captions_file", str(data / "captions.csv")]) == 0
    after = json.loads((data / "metadata.json").read_text())
    changed = [i for i, (a, b) in enumerate(zip(before["clips"], after["clips"])) if a != b]
    assert changed == [1]
    assert after["clips"][1]["text"] == "lofi piano, dusty drums, 80 BPM"
    assert after["clips"][1]["caption_source"] == "edited"
    assert {k: v for k, v in after.items() if k != "clips"} == {k: v for k, v in before.items() if k != "clips"}
    clips, stats = build_token_cache(load_metadata(data), model, processor, info, data, show_progress=False)
    assert stats["clips_encoded"] == 0 and stats["texts_encoded"] == 1
    assert clips[1].text == "lofi piano, dusty drums, 80 BPM"


def test_a_prepare_rerun_keeps_the_edits(prepared):
    songs, data = prepared
    rows = _rows(data / "captions.csv")
    rows[0]["caption"] = "edited by hand"
    _write_rows(data / "captions.csv", rows)
    assert prepare_data.main(["--data_dir", str(data), "--captions_file", str(data / "captions.csv")]) == 0
    argv = ["--input_dir", str(songs), "--output_dir", str(data), "--min_seconds", "2", "--num_workers", "1"]
    assert prepare_data.main(argv + ["--segment_seconds", "3"]) == 0  # reused
    assert load_metadata(data)[0].text == "edited by hand"
    assert prepare_data.main(argv + ["--segment_seconds", "3", "--trim_silence", "false"]) == 0  # decoded
    first = json.loads((data / "metadata.json").read_text())["clips"][0]
    assert first["text"] == "edited by hand" and first["caption_source"] == "edited"
    assert _rows(data / "captions.csv")[0]["caption"] == "edited by hand"


def test_unapplied_edits_are_never_overwritten(prepared):
    songs, data = prepared
    rows = _rows(data / "captions.csv")
    rows[0]["caption"] = "not applied yet"
    _write_rows(data / "captions.csv", rows)
    text = (data / "captions.csv").read_bytes()
    meta = (data / "metadata.json").read_bytes()
    with pytest.raises(UserError, match="edits that are not applied yet"):
        prepare_data.main(["--input_dir", str(songs), "--output_dir", str(data), "--min_seconds", "2",
                           "--segment_seconds", "3"])
    assert (data / "captions.csv").read_bytes() == text and (data / "metadata.json").read_bytes() == meta


def test_tag_edits_rewrite_the_caption_from_the_template(prepared):
    _, data = prepared
    rows = _rows(data / "captions.csv")
    rows[2]["tags"] = "genre: jazz; mood: calm, dreamy"
    _write_rows(data / "captions.csv", rows)
    assert prepare_data.main(["--data_dir", str(data), "--captions_file", str(data / "captions.csv")]) == 0
    clip = json.loads((data / "metadata.json").read_text())["clips"][2]
    assert clip["text"] == "jazz, calm, dreamy" and clip["caption_source"] == "edited tags"
    assert clip["tags"] == {"genre": [{"label": "jazz"}], "mood": [{"label": "calm"}, {"label": "dreamy"}]}


@pytest.mark.parametrize("mangle,message", [
    (lambda rows: rows[0].update(clip="train/nope.wav"), "name a clip that metadata.json does not have"),
    (lambda rows: rows.append(dict(rows[0])), "keep one row per clip"),
    (lambda rows: [r.pop("clip") for r in rows], "needs the columns clip and caption"),
    (lambda rows: rows[0].update(tags="no colon here"), "must read 'name: label, label'"),
])
def test_bad_tables_are_messages_and_change_nothing(prepared, tmp_path, mangle, message):
    _, data = prepared
    rows = _rows(data / "captions.csv")
    rows[1]["caption"] = "an edit that must not land"
    mangle(rows)
    table = tmp_path / "edited.csv"
    _write_rows(table, rows)
    meta = (data / "metadata.json").read_bytes()
    with pytest.raises(UserError, match=message):
        prepare_data.main(["--data_dir", str(data), "--captions_file", str(table)])
    assert (data / "metadata.json").read_bytes() == meta


def test_a_review_table_given_with_input_dir_is_refused(prepared):
    songs, data = prepared
    from lora.common.fields import ConfigError

    with pytest.raises(ConfigError, match="is a review table"):
        prepare_data.main(["--input_dir", str(songs), "--output_dir", str(data), "--captions_file",
                           str(data / "captions.csv")])


def test_the_trigger_word_is_recorded_and_put_in_every_caption(prepared):
    songs, data = prepared
    plain = [r.text for r in load_metadata(data)]
    assert prepare_data.main(["--data_dir", str(data), "--trigger_word", "zxq style"]) == 0
    doc = json.loads((data / "metadata.json").read_text())
    assert doc["trigger_word"] == "zxq style" and doc["trigger_position"] == "start"
    assert [c["text"] for c in doc["clips"]] == plain  # stored without it
    assert [r.text for r in load_metadata(data)] == [f"zxq style, {t}" for t in plain]
    # a rerun without the flag keeps it; --trigger_position off removes it
    assert prepare_data.main(["--input_dir", str(songs), "--output_dir", str(data), "--min_seconds", "2",
                              "--segment_seconds", "3"]) == 0
    assert json.loads((data / "metadata.json").read_text())["trigger_word"] == "zxq style"
    assert prepare_data.main(["--data_dir", str(data), "--trigger_position", "off"]) == 0
    assert "trigger_word" not in json.loads((data / "metadata.json").read_text())
    assert apply_trigger("lofi", "zxq", "end") == "lofi, zxq"
    assert apply_trigger("lofi", "zxq", "replace") == "zxq"
    assert apply_trigger("a ZXQ beat", "zxq", "start") == "a ZXQ beat"
    assert apply_trigger("", "zxq", "start") == "zxq"


def test_bad_trigger_and_review_values_are_messages(prepared, tmp_path):
    from lora.common.fields import ConfigError

    _, data = prepared
    with pytest.raises(ConfigError, match="--trigger_position"):
        prepare_data.main(["--data_dir", str(data), "--trigger_word", "x", "--trigger_position", "middle"])
    with pytest.raises(ConfigError, match="does not exist: pass --data_dir"):
        prepare_data.main(["--data_dir", str(tmp_path / "none"), "--trigger_word", "x"])
    with pytest.raises(ConfigError, match="data.captions_file: .* not found"):
        prepare_data.main(["--data_dir", str(data), "--captions_file", str(tmp_path / "none.csv")])
