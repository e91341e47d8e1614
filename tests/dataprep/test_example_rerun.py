"""DATA_PREPARATION.md: re-running --create_example into the same folder has nothing to do; a changed
or missing clip, or other settings, write it again."""

from __future__ import annotations

import json


def _clips(data):
    return {p.name: p.stat().st_mtime_ns for p in sorted(data.glob("*/*.wav"))}


def test_rerunning_create_example_has_nothing_to_do(tmp_path):
    """Today's main rewrites every clip (160 in the default set) on each rerun."""
    from lora import prepare_data

    data = tmp_path / "data"
    args = ["--create_example", "--output_dir", str(data), "--example_clips", "8", "--example_seconds", "1"]
    assert prepare_data.main(args) == 0
    first, meta = _clips(data), (data / "metadata.json").read_bytes()
    assert len(first) == 8
    assert prepare_data.main(args) == 0
    assert _clips(data) == first and (data / "metadata.json").read_bytes() == meta
    # a clip changed by hand: written again
    victim = sorted(data.glob("train/*.wav"))[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    assert prepare_data.main(args) == 0
    assert _clips(data)[victim.name] != first[victim.name]
    # other settings: written again, as asked
    assert prepare_data.main([*args[:-1], "2"]) == 0
    meta = json.loads((data / "metadata.json").read_text())
    assert {c["duration"] for c in meta["clips"]} == {2.0}
