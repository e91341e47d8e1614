"""evaluate.py says what it did: fewer prompts than --num_prompts (only one held-out caption) is
said, with advice that can help; a rerun into the same folder leaves only its own clips there (and in
report.html), and the user's files beside them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lora.common.cli import UserError
from tests.helpers import sha1s

pytestmark = pytest.mark.slow  # (two evaluations of the tiny model)


def _one_caption_data(src: Path, dst: Path) -> Path:
    """The example data with every held-out clip captioned alike (one distinct held-out caption)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cache"))
    meta = json.loads((dst / "metadata.json").read_text())
    for clip in meta["clips"]:
        if clip["split"] == "valid":
            clip["text"] = "techno drum loop, 128 BPM"
    (dst / "metadata.json").write_text(json.dumps(meta))
    return dst


def _evaluate(tiny_model_dir, adapter, data, out, *extra):
    from lora import evaluate

    assert evaluate.main(["--base_model_path", str(tiny_model_dir), "--lora_model_path", str(adapter),
                          "--data_dir", str(data), "--output_dir", str(out), "--compare",
                          "--eval_duration", "0.5", "--bootstrap_samples", "200", *extra]) == 0
    return json.loads((out / "results.json").read_text())


def test_few_prompts_are_said_and_a_rerun_keeps_only_its_clips(tmp_path, tiny_model_dir, example_data_dir,
                                                               trained_output_dir):
    adapter = trained_output_dir / "best_model"
    out = tmp_path / "evaluation"
    first = _evaluate(tiny_model_dir, adapter, example_data_dir, out, "--num_prompts", "2", "--eval_seeds", "2")
    assert len(first["generation"]["prompts"]) == 2
    assert len(list((out / "audio" / "base").glob("*.wav"))) == 4
    (out / "audio" / "my_notes.txt").write_text("mine")
    (out / "audio" / "base" / "keep me.wav").write_bytes(b"mine")

    data = _one_caption_data(example_data_dir, tmp_path / "one_caption")
    # files of the user's inside the evaluation's folders: the rerun (which replaces those folders)
    # is refused, naming them, and nothing is changed (the ownership rule, lora.common.ownership)
    before = sha1s(out)
    with pytest.raises(UserError) as e:
        _evaluate(tiny_model_dir, adapter, data, out, "--eval_seeds", "1")
    assert "my_notes.txt" in str(e.value) and "keep me.wav" in str(e.value) and sha1s(out) == before
    (out / "audio" / "my_notes.txt").rename(tmp_path / "my_notes.txt")
    (out / "audio" / "base" / "keep me.wav").rename(tmp_path / "keep me.wav")
    second = _evaluate(tiny_model_dir, adapter, data, out, "--eval_seeds", "1")  # --num_prompts 8
    # said, with advice that can help (today's main: one prompt used without a word, and a note
    # advising a higher --num_prompts)
    assert second["generation"]["prompts"] == ["techno drum loop, 128 BPM"]
    notes = " ".join(second["notes"])
    assert "use 1 prompt(s), not --num_prompts 8: there are only 1 distinct held-out caption(s)" in notes
    assert "--prompts_file" in notes and "raise --num_prompts" not in notes
    # only this run's clips (today's main keeps the first run's 4 per model beside them)
    for kind, ext in (("audio", "wav"), ("spectrograms", "png")):
        for model in ("base", "lora"):
            got = sorted(p.name for p in (out / kind / model).glob(f"p*.{ext}"))
            assert got == [f"p000_s{second['generation']['seeds'][0]}.{ext}"], (kind, model, got)
    report = (out / "report.html").read_text()
    assert "p001_" not in report
    assert (tmp_path / "my_notes.txt").read_text() == "mine"
