"""The "next step" each script prints works from wherever the user stands (inside lora/ as the plan
does, at the repository root, or elsewhere) and carries the model path they used."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.helpers import ROOT

LORA = ROOT / "lora"


def _resolved(path: str, cwd: Path) -> Path:
    p = Path(path)
    return (p if p.is_absolute() else cwd / p).resolve()


def _flag(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


def test_script_command_and_paths_from_each_place(monkeypatch, tmp_path):
    from lora.common.cli import script_command, shown_model, shown_path

    monkeypatch.chdir(LORA)
    assert script_command("train_lora.py") == "python train_lora.py"
    assert shown_path(ROOT / "data") == "../data"
    assert shown_model("tiny") == "tiny" and shown_model("facebook/musicgen-small") == "facebook/musicgen-small"
    monkeypatch.chdir(ROOT)
    assert script_command("train_lora.py") == "python lora/train_lora.py"
    assert shown_path(ROOT / "data") == "data"
    assert shown_model(str(ROOT / "models" / "small")) == "models/small"
    monkeypatch.chdir(tmp_path)
    assert script_command("train_lora.py") == f"python {shlex.quote(str(LORA / 'train_lora.py'))}"
    assert shown_path(ROOT / "data") == shlex.quote(str(ROOT / "data"))  # far away: absolute
    assert shown_path(tmp_path / "my data") == "'my data'"


def test_test_model_from_lora_suggests_a_training_command_that_runs_there(monkeypatch, capsys, tmp_path,
                                                                          tiny_model_dir):
    """Today's main prints `python train_lora.py ... --data_dir data --output_dir output` from
    lora/: lora/data does not exist there (and the run would leave lora/output behind)."""
    from lora import test_model

    monkeypatch.chdir(LORA)
    assert test_model.main(["--model_path", str(tiny_model_dir), "--skip_generation",
                            "--max_duration", "1"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("OK — next step:"))
    cmd = line.split(", then ")[-1] if ", then " in line else line.split("next step: ")[1]
    words = shlex.split(cmd)
    assert words[:2] == ["python", "train_lora.py"]
    assert (LORA / words[1]).is_file()
    assert _flag(words, "--model_path") == str(tiny_model_dir)  # the model they used
    assert _resolved(_flag(words, "--data_dir"), LORA) == ROOT / "data"  # config.yaml's, from lora/
    assert _flag(words, "--data_dir") == "../data" and _flag(words, "--output_dir") == "../output"
    if not (ROOT / "data" / "metadata.json").is_file():  # no dataset yet: prepare it first
        assert "prepare your audio: python prepare_data.py --input_dir YOUR_AUDIO --output_dir ../data" in line


def test_test_dataset_carries_the_model_path(monkeypatch, capsys, tmp_path, tiny_model_dir, example_data_dir):
    """Today's main suggests `python test_model.py` with no --model_path: the default hub model
    (offline: half a minute of retries)."""
    from lora import test_dataset

    monkeypatch.chdir(tmp_path)
    assert test_dataset.main(["--data_dir", str(example_data_dir), "--model_path", str(tiny_model_dir),
                              "--num_batches", "1", "--max_duration", "1"]) == 0
    verdict = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("VERDICT: OK"))
    words = shlex.split(verdict.split("next: ")[1].split("   (then ")[0])
    assert words[:2] == ["python", str(LORA / "test_model.py")]  # from elsewhere: the full path
    assert _resolved(_flag(words, "--model_path"), tmp_path) == tiny_model_dir  # the model they used
    then = shlex.split(verdict.split("   (then ")[1].rstrip(" .)"))
    assert _resolved(_flag(then, "--data_dir"), tmp_path) == example_data_dir


def test_prepare_data_next_step_from_lora(monkeypatch, capsys, tmp_path):
    """Today's main says `python lora/test_dataset.py` whatever the folder: from lora/ that path does
    not exist."""
    from lora import prepare_data

    monkeypatch.chdir(LORA)
    out = tmp_path / "data"
    assert prepare_data.main(["--create_example", "--output_dir", str(out), "--example_clips", "8",
                              "--example_seconds", "1"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("Next:"))
    assert line == f"Next: python test_dataset.py --data_dir {out}"


@pytest.mark.slow
def test_train_lora_listen_hint_from_lora(monkeypatch, tmp_path, tiny_model_dir, example_data_dir):
    """Today's main says `python lora/inference_lora.py`, a path that does not exist from lora/."""
    from lora import train_lora

    monkeypatch.chdir(LORA)
    out = tmp_path / "run"
    assert train_lora.main(["--model_path", str(tiny_model_dir), "--data_dir", str(example_data_dir),
                            "--output_dir", str(out), "--max_steps", "1", "--mixed_precision", "no",
                            "--max_duration", "1", "--gradient_accumulation_steps", "1"]) == 0
    log = (out / "logs" / "train.log").read_text()  # (the console's lines)
    listen = re.search(r"INFO Listen: (.*)", log).group(1)
    words = shlex.split(listen)
    assert words[:2] == ["python", "inference_lora.py"] and (LORA / words[1]).is_file()
    assert _resolved(_flag(words, "--base_model_path"), LORA) == tiny_model_dir
    assert _resolved(_flag(words, "--lora_model_path"), LORA) == out / "best_model"


def test_training_on_a_missing_data_folder_leaves_nothing_behind(monkeypatch, tmp_path, tiny_model_dir):
    """Today's main makes output_dir and its .train_lora.lock before it finds there is no data
    (from lora/, a stray lora/output in `git status`)."""
    from lora import train_lora
    from lora.common.cli import UserError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        train_lora.main(["--model_path", str(tiny_model_dir), "--data_dir", "data", "--output_dir", "output"])
    assert not (tmp_path / "output").exists()
    hint = re.search(r"Create it with: (.*?) \(or", str(e.value)).group(1)
    script = shlex.quote(str(LORA / "prepare_data.py"))
    assert hint == f"python {script} --input_dir YOUR_AUDIO --output_dir data"
