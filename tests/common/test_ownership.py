"""The ownership rule of every script that writes a folder (lora/common/ownership.py): a file the
script did not write, where it would write, is refused naming it (with --overwrite too) and nothing
changes; --overwrite replaces only what the script wrote; a model's folder is never an output (the
built-in tiny models' folders included)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from lora.common.cli import UserError


def _sums(folder: Path) -> dict:
    """sha1 of every file (train_lora.py's empty lock file aside)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".train_lora.lock"}


def _argv(script: str, out: Path, tiny: Path, adapter: Path, data: Path) -> list[str]:
    """Each script's command writing into ``out``, with its overwrite flag where it has one."""
    return {
        "export_model": ["--base_model_path", str(tiny), "--lora_model_path", str(adapter),
                         "--output_dir", str(out), "--overwrite"],
        "evaluate": ["--base_model_path", str(tiny), "--lora_model_path", str(adapter), "--data_dir",
                     str(data), "--output_dir", str(out), "--skip_generation",
                     "--bootstrap_samples", "100"],
        "inference_lora": ["--base_model_path", str(tiny), "--lora_model_path", str(adapter),
                           "--prompts", "lofi piano", "--duration", "0.5", "--output_dir", str(out),
                           "--overwrite"],
        "train_lora": ["--model_path", str(tiny), "--data_dir", str(data), "--output_dir", str(out),
                       "--max_steps", "1", "--mixed_precision", "no", "--overwrite_output_dir"],
        "prepare_data": ["--create_example", "--example_clips", "8", "--example_seconds", "1",
                         "--output_dir", str(out), "--overwrite"],
    }[script]


# where each script writes a file a user may already have there
USER_FILE = {"export_model": "notes.txt", "evaluate": "config.yaml", "inference_lora": "manifest.json",
             "train_lora": "config.yaml", "prepare_data": "metadata.json"}


@pytest.mark.slow  # (over ~2 s: the full suite runs it, the fast loop leaves it out)
@pytest.mark.parametrize("script", sorted(USER_FILE))
def test_a_file_the_script_did_not_write_is_refused_by_name_and_kept(
        script, tmp_path, tiny_model_dir, trained_output_dir, example_data_dir):
    import importlib

    main = importlib.import_module(f"lora.{script}").main
    data = tmp_path / "data"
    shutil.copytree(example_data_dir, data, ignore=shutil.ignore_patterns("cache"))
    out = tmp_path / "out"
    out.mkdir()
    mine = out / USER_FILE[script]
    mine.write_text('{"mine": "a file of the user\'s, not the tool\'s"}\n')
    before = _sums(out)
    with pytest.raises(UserError) as e:
        main(_argv(script, out, tiny_model_dir, trained_output_dir / "best_model", data))
    assert str(mine) in str(e.value) and "did not write" in str(e.value), str(e.value)
    assert _sums(out) == before  # nothing written, nothing deleted


def test_overwrite_replaces_only_the_scripts_own_files(tmp_path, tiny_model_dir, trained_output_dir):
    from lora import export_model

    out = tmp_path / "merged"
    argv = _argv("export_model", out, tiny_model_dir, trained_output_dir / "best_model", tmp_path)
    assert export_model.main(argv[:-1]) == 0
    written = _sums(out)
    assert json.loads((out / ".written_by_export_model.json").read_text())["written"]
    with pytest.raises(UserError, match="--overwrite"):  # its own earlier export: only on request
        export_model.main(argv[:-1])
    assert export_model.main(argv) == 0  # replaced: all of it was the script's
    assert set(_sums(out)) == set(written)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        export_model.main(argv)
    assert (out / "notes.txt").read_text() == "mine" and set(_sums(out)) == set(written) | {"notes.txt"}


@pytest.mark.parametrize("where", ["builtin", "adapter", "base"])
def test_a_models_folder_is_never_an_output(where, tmp_path, tiny_model_dir, trained_output_dir):
    """export_model.py --overwrite onto the folder of the built-in model it reads ('tiny', the
    guard was skipped for built-in names), evaluate.py into the adapter's folder, inference into the
    base model's."""
    from lora import evaluate, export_model, inference_lora
    from lora.modeling.tiny_model import ensure_tiny_model

    adapter = tmp_path / "adapter"
    shutil.copytree(trained_output_dir / "best_model", adapter)
    if where == "builtin":
        folder = ensure_tiny_model(tmp_path / "tiny_models" / "mono", stereo=False)
        argv = ["--base_model_path", "tiny", "--tiny_model_dir", str(tmp_path / "tiny_models"),
                "--lora_model_path", str(adapter), "--output_dir", str(folder), "--overwrite"]
        main = export_model.main
    elif where == "adapter":
        folder = adapter
        argv = ["--base_model_path", str(tiny_model_dir), "--lora_model_path", str(adapter),
                "--output_dir", str(folder), "--skip_generation"]
        main = evaluate.main
    else:
        folder = tmp_path / "base"
        shutil.copytree(tiny_model_dir, folder)
        argv = ["--base_model_path", str(folder), "--lora_model_path", "none", "--prompts", "x",
                "--duration", "0.5", "--output_dir", str(folder / "generated")]
        main = inference_lora.main
    before = _sums(folder)
    with pytest.raises(UserError, match="a model's folder is never an output"):
        main(argv)
    assert _sums(folder) == before
