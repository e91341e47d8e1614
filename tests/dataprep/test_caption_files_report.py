"""prepare_report.json counts what the scan left out on purpose: a caption file it read with the
audio (a sidecar .txt/.json, metadata.jsonl/.csv at the top) is not one of them."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf


def test_a_sidecar_caption_it_used_is_not_counted_as_ignored(tmp_path):
    """Today's main reports the song's own .txt caption under ignored_files."""
    from lora import prepare_data

    src = tmp_path / "audio"
    (src / "album").mkdir(parents=True)
    t = np.arange(32000 * 8) / 32000
    sf.write(src / "album" / "song.flac", 0.3 * np.sin(2 * np.pi * 220 * t), 32000)
    sf.write(src / "riff.wav", 0.3 * np.sin(2 * np.pi * 330 * t), 32000)
    (src / "album" / "song.txt").write_text("warm sine drone, 90 BPM", encoding="utf-8")
    (src / "notes.txt").write_text("not a caption: no audio called notes", encoding="utf-8")
    (src / "cover.jpg").write_bytes(b"\xff\xd8")
    out = tmp_path / "data"
    assert prepare_data.main(["--input_dir", str(src), "--output_dir", str(out), "--valid_fraction", "0.5"]) == 0
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["caption_sources"].get("sidecar") == 1
    assert report["caption_files"] == 1
    assert report["ignored_files"] == {".txt": 1, ".jpg": 1}  # notes.txt and the cover
