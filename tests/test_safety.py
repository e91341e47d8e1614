"""Never lose, overwrite or silently change what the user has (training, generation, evaluation,
config side; tests/test_data_safety.py has prepare_data's). Where a case says nothing may change,
the user's files are checksummed before and after."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf

from tests.helpers import ROOT

TRAIN = ROOT / "lora" / "train_lora.py"


def _sums(folder: Path) -> dict:
    """Checksums of the files in ``folder`` (train_lora.py's hidden lock file, which holds no data,
    aside)."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".train_lora.lock"}


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _train_args(tiny_model_dir, data_dir, out, *extra):
    own = {"--max_steps": "2", "--gradient_accumulation_steps": "1", "--eval_steps": "100",
           "--save_steps": "1",
           "--logging_steps": "1", "--mixed_precision": "no", "--max_duration": "1"}
    args = ["--model_path", str(tiny_model_dir), "--data_dir", str(data_dir), "--output_dir", str(out)]
    for flag, value in own.items():
        if flag not in extra:
            args += [flag, value]
    return args + [str(a) for a in extra]


# ------------------------------------------------------------------------------------------
# 1. Data loss: --overwrite_output_dir deletes only what train_lora.py wrote; one run per output folder
# ------------------------------------------------------------------------------------------
def test_overwrite_output_dir_never_deletes_a_folder_the_tool_did_not_make(tmp_path, tiny_model_dir,
                                                                          example_data_dir):
    """The issue's command: a user's checkpoints/x/model.th survives --overwrite_output_dir."""
    proj = tmp_path / "proj"
    (proj / "checkpoints" / "x").mkdir(parents=True)
    (proj / "checkpoints" / "x" / "model.th").write_text("w\n")
    before = _sums(proj)
    r = subprocess.run([sys.executable, str(TRAIN), "--model_path", str(tiny_model_dir), "--data_dir",
                        str(example_data_dir), "--output_dir", str(proj), "--max_steps", "1",
                        "--overwrite_output_dir"], env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    assert "did not write" in r.stderr and str(proj / "checkpoints" / "x") in r.stderr
    assert "Nothing was deleted" in r.stderr and "Traceback" not in r.stderr
    assert _sums(proj) == before  # model.th is there, unchanged


def test_overwrite_deletes_an_earlier_run_but_not_a_file_added_to_it(tmp_path, tiny_model_dir,
                                                                     example_data_dir):
    from lora import train_lora
    from lora.common.cli import UserError

    out = tmp_path / "out"
    assert train_lora.main(_train_args(tiny_model_dir, example_data_dir, out)) == 0
    (out / "best_model" / "my_notes.txt").write_text("mine")
    before = _sums(out)
    with pytest.raises(UserError, match="did not write") as e:
        train_lora.main(_train_args(tiny_model_dir, example_data_dir, out, "--overwrite_output_dir"))
    assert "my_notes.txt" in str(e.value)
    assert _sums(out) == before
    (out / "best_model" / "my_notes.txt").unlink()
    old_ckpt = sorted((out / "checkpoints").iterdir())
    assert train_lora.main(_train_args(tiny_model_dir, example_data_dir, out, "--overwrite_output_dir",
                                       # the tool's own files: deleted and rewritten
                                       "--seed", "7")) == 0
    assert json.loads((out / "best_model" / "trainer_state.json").read_text())["run"]["seed"] == 7
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [p.name for p in old_ckpt]


def _hold_lock(out: Path):
    """A second process holding train_lora.py's lock on ``out`` (as a running training does)."""
    code = ("import sys, time; sys.path.insert(0, %r); from pathlib import Path; from "
            "lora.training import checkpoints\nwith checkpoints.output_lock(Path(%r)):\n    "
            "print('locked', flush=True); time.sleep(120)\n"
            % (str(ROOT), str(out)))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_training_on_the_same_folder_stops_at_once(tmp_path, tiny_model_dir, example_data_dir):
    from lora import train_lora
    from lora.common.cli import UserError

    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        t0 = time.monotonic()
        with pytest.raises(UserError) as e:
            train_lora.main(_train_args(tiny_model_dir, example_data_dir, out, "--overwrite_output_dir"))
        msg = str(e.value)
        assert str(out) in msg and f"pid {holder.pid}" in msg and "another training run" in msg
        assert time.monotonic() - t0 < 10  # before the model loads
        assert not (out / "logs").exists() and not (out / "checkpoints").exists()  # nothing written
    finally:
        holder.kill()  # a killed run (SIGKILL) ...
        holder.wait()
    # ... does not leave the folder locked
    assert train_lora.main(_train_args(tiny_model_dir, example_data_dir, out)) == 0


# ------------------------------------------------------------------------------------------
# 3. Damaged artifacts: a message naming the file; 'latest' falls back to a checkpoint that loads whole
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tiny_model_dir, example_data_dir):
    from lora import train_lora

    out = tmp_path_factory.mktemp("short") / "out"
    assert train_lora.main(_train_args(tiny_model_dir, example_data_dir, out, "--max_steps", "3")) == 0
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000001",
                                                                         "step-000002", "step-000003"]
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("damage", ["adapter", "optimizer", "state"])
def test_resume_latest_falls_back_to_the_newest_checkpoint_that_loads(damage, short_run, tmp_path,
                                                                      tiny_model_dir,
                                                                      example_data_dir, caplog):
    from lora import train_lora
    from lora.common.cli import UserError

    out = _copy(short_run, tmp_path)
    newest = out / "checkpoints" / "step-000003"
    if damage == "adapter":
        _truncate(newest / "adapter_model.safetensors")
    elif damage == "optimizer":
        (newest / "optimizer.pt").write_bytes(b"")  # 0 bytes
    else:
        (newest / "trainer_state.json").write_text("[1, 2, 3]")  # valid JSON, not an object
    # the damaged one named explicitly: a message naming the file
    with pytest.raises(UserError) as e:
        train_lora.main(_train_args(tiny_model_dir, example_data_dir, out, "--max_steps", "4",
                                    "--resume_from_checkpoint", newest))
    named = {"adapter": "adapter_model.safetensors", "optimizer": "optimizer.pt",
             "state": "trainer_state.json"}
    assert named[damage] in str(e.value) and "latest" in str(e.value)
    assert train_lora.main(_train_args(tiny_model_dir, example_data_dir, out, "--max_steps", "4",
                                       "--resume_from_checkpoint", "latest")) == 0
    text = caplog.text
    assert "step-000003" in text and "Resumed from" in text and str(out / "checkpoints"
                                                                    / "step-000002") in text
    assert json.loads((out / "final_model" / "trainer_state.json").read_text())["global_step"] == 4


def test_a_truncated_adapter_is_a_message_in_inference_and_evaluation(short_run, tmp_path, tiny_model_dir,
                                                                        example_data_dir, monkeypatch):
    from lora import evaluate, inference_lora
    from lora.common.cli import UserError
    from lora.modeling import loading

    adapter = tmp_path / "adapter"
    shutil.copytree(short_run / "best_model", adapter)
    _truncate(adapter / "adapter_model.safetensors")
    monkeypatch.setattr(loading, "load_base_model", lambda *a,
                        **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(UserError, match="adapter_model.safetensors is damaged"):
        inference_lora.main(["--model_path", str(tiny_model_dir), "--lora_model_path", str(adapter),
                             "--prompts", "x", "--output_dir", str(tmp_path / "gen")])
    with pytest.raises(UserError, match="adapter_model.safetensors is damaged"):
        evaluate.main(["--model_path", str(tiny_model_dir), "--lora_model_path", str(adapter),
                       "--data_dir",
                       str(example_data_dir), "--output_dir", str(tmp_path / "ev"), "--compare"])
    assert not (tmp_path / "gen").exists() and not (tmp_path / "ev").exists()


@pytest.mark.parametrize("entry, key", [({"offset": None}, "offset"), ({"source": ["a", "b"]}, "source"),
                                        ({"duration": "long"}, "duration")])
def test_hand_edited_metadata_with_wrong_types_is_a_message_in_every_script(entry, key, tmp_path,
                                                                            tiny_model_dir,
                                                                           example_data_dir):
    from lora import evaluate, test_dataset, train_lora
    from lora.common.cli import UserError

    data = tmp_path / "data"
    shutil.copytree(example_data_dir, data, ignore=shutil.ignore_patterns("cache"))
    meta = json.loads((data / "metadata.json").read_text())
    meta["clips"][2].update(entry)
    (data / "metadata.json").write_text(json.dumps(meta))
    before = _sums(data)
    where = f"entry 2 ({meta['clips'][2]['audio']})"
    for run in (lambda: train_lora.main(_train_args(tiny_model_dir, data, tmp_path / "out")),
                lambda: evaluate.main(["--model_path", str(tiny_model_dir), "--data_dir", str(data),
                                       "--lora_model_path", "none", "--output_dir",
                                       str(tmp_path / "ev")]),
                lambda: test_dataset.main(["--data_dir", str(data)])):
        with pytest.raises(UserError) as e:
            run()
        assert where in str(e.value) and f"'{key}'" in str(e.value)
    assert _sums(data) == before


# ------------------------------------------------------------------------------------------
# Config: not UTF-8, a key under the wrong section, a flag given twice
# ------------------------------------------------------------------------------------------
def test_config_yaml_that_is_not_utf8_names_the_file_and_line(tmp_path):
    from lora.common.fields import ConfigError
    from lora.config import parse_config

    y = tmp_path / "config.yaml"
    y.write_bytes("training:\n  seed: 3\n  # caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(y)], sections=("training",))
    assert str(y) in str(e.value) and "line 3" in str(e.value) and "UTF-8" in str(e.value)
    y.write_bytes("\ufefftraining:\n  seed: 3\n".encode("utf-8"))  # a byte-order mark is fine
    assert parse_config(["--config", str(y)], sections=("training",))[0].training.seed == 3


def test_a_key_under_the_wrong_section_names_its_section(tmp_path):
    from lora.common.fields import ConfigError
    from lora.config import parse_config

    y = tmp_path / "config.yaml"
    y.write_text("training:\n  lora_rank: 8\n")
    with pytest.raises(ConfigError,
                       match=r"'lora_rank' is a key of section 'lora', not of 'training'.*lora:"):
        parse_config(["--config", str(y)], sections=("training", "lora"))


def test_a_flag_given_twice_is_refused_and_a_list_flag_keeps_both(caplog):
    from lora.common.fields import ConfigError
    from lora.config import parse_config

    with pytest.raises(ConfigError, match="--duration was given twice"):
        parse_config(["--duration", "3", "--duration=4"], sections=("generation", "model"))
    with pytest.raises(ConfigError, match=r"given twice \(as --model_path and --base_model_path\)"):
        parse_config(["--model_path", "a/b", "--base_model_path", "c/d"],
                     sections=("generation", "model"))
    cfg, _ = parse_config(["--prompts", "a", "--prompts", "b", "c"], sections=("generation", "model"))
    assert cfg.generation.prompts == ["a", "b", "c"] and "all of its values are used" in caplog.text


# ------------------------------------------------------------------------------------------
# Inputs checked before the model loads; output paths; windows shorter than a frame
# ------------------------------------------------------------------------------------------
def test_an_unreadable_audio_prompt_is_refused_before_the_model_loads(tmp_path, tiny_model_dir,
                                                                      monkeypatch):
    from lora import inference_lora
    from lora.common.cli import UserError
    from lora.modeling import loading

    bad = tmp_path / "intro.wav"
    bad.write_text("not audio")
    monkeypatch.setattr(loading, "load_base_model", lambda *a,
                        **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(UserError, match=r"audio_prompt: .*intro.wav.*not a readable audio file"):
        inference_lora.main(["--model_path", str(tiny_model_dir), "--lora_model_path", "none",
                             "--prompts", "x",
                             "--audio_prompt", str(bad), "--output_dir", str(tmp_path / "gen")])


@pytest.mark.parametrize("script", ["train_lora", "inference_lora", "evaluate"])
def test_an_output_dir_that_is_a_file_is_a_message_and_nothing_changes(script, tmp_path, tiny_model_dir,
                                                                       example_data_dir):
    from lora import evaluate, inference_lora, train_lora
    from lora.common.cli import UserError

    target = tmp_path / "taken"
    target.write_text("my file")
    args = {"train_lora": _train_args(tiny_model_dir, example_data_dir, target),
            "inference_lora": ["--model_path", str(tiny_model_dir), "--lora_model_path", "none",
                               "--prompts", "x", "--output_dir", str(target)],
            "evaluate": ["--model_path", str(tiny_model_dir), "--lora_model_path", "none", "--data_dir",
                         str(example_data_dir), "--output_dir", str(target)]}[script]
    main = {"train_lora": train_lora.main, "inference_lora": inference_lora.main,
            "evaluate": evaluate.main}[script]
    with pytest.raises(UserError, match=f"{target}.*is a file, not a folder"):
        main(args)
    assert target.read_text() == "my file"


def test_max_duration_shorter_than_one_frame_is_a_message(tmp_path, tiny_model_dir, example_data_dir):
    from lora import train_lora
    from lora.common.fields import ConfigError

    with pytest.raises(ConfigError, match="shorter than one codec frame"):
        train_lora.main(_train_args(tiny_model_dir, example_data_dir, tmp_path / "out",
                                    "--max_duration", "0.005"))


# ------------------------------------------------------------------------------------------
# A full disk
# ------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (root only); skipped with the reason where mounting is not permitted."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): the "
                    f"disk-full cases need one")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_training_on_a_full_disk_says_how_much_it_needs(small_disk, tiny_model_dir,
                                                        example_data_dir, capsys):
    from lora import train_lora
    from lora.common.cli import run_main

    rc = run_main(train_lora.main, _train_args(tiny_model_dir, example_data_dir, small_disk / "out"))
    err = capsys.readouterr().err
    assert rc == 2 and "Not enough free disk space" in err and "training" in err and "needs about" in err


def test_generation_checks_free_space_first_and_a_full_disk_is_a_message(small_disk, tiny_model_dir,
                                                                         tmp_path,
                                                                         monkeypatch, capsys):
    from lora import inference_lora
    from lora.common.cli import run_main

    args = ["--model_path", str(tiny_model_dir), "--lora_model_path", "none", "--prompts", "a", "b",
            "--duration", "20", "--output_format", "float", "--output_dir", str(small_disk / "gen")]
    rc = run_main(inference_lora.main, args)
    err = capsys.readouterr().err
    assert rc == 2 and "Not enough free disk space" in err and "2 WAV file(s) needs about" in err
    assert not (small_disk / "gen").exists() or not any((small_disk / "gen").iterdir())
    # past the estimate (it is skipped here), the disk fills up while writing: a message, not a
    # traceback
    (small_disk / "filler").write_bytes(b"\0" * 900_000)
    monkeypatch.setattr(inference_lora, "check_free_space", lambda *a, **k: None)
    rc = run_main(inference_lora.main, ["--model_path", str(tiny_model_dir), "--lora_model_path", "none",
                                        "--prompts", "a", "--duration", "2", "--output_format", "float",
                                        "--output_dir", str(small_disk / "gen2")])
    err = capsys.readouterr().err
    assert rc == 2 and "The disk is full" in err and "Traceback" not in err


def test_a_full_disk_during_a_checkpoint_is_a_message(tmp_path, tiny_model_dir, example_data_dir,
                                                      monkeypatch, capsys):
    from lora import train_lora
    from lora.common.cli import run_main
    from lora.training import checkpoints

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "checkpoints"))

    monkeypatch.setattr(checkpoints, "save_checkpoint", full)
    rc = run_main(train_lora.main, _train_args(tiny_model_dir, example_data_dir, tmp_path / "out"))
    err = capsys.readouterr().err
    assert rc == 2 and "The disk is full" in err and "training writes checkpoints" in err


# ------------------------------------------------------------------------------------------
# Ctrl-C says what was saved and how to continue
# ------------------------------------------------------------------------------------------
def test_ctrl_c_in_training_names_the_checkpoint_and_how_to_resume(tmp_path, tiny_model_dir,
                                                                   example_data_dir,
                                                                   monkeypatch, capsys):
    from lora import train_lora
    from lora.common.cli import run_main
    from lora.training import step

    real = step.step_loss
    calls = {"n": 0}

    def interrupt_at_third_step(model, *a, **k):
        if model.training:
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
        return real(model, *a, **k)

    monkeypatch.setattr(step, "step_loss", interrupt_at_third_step)
    rc = run_main(train_lora.main,
                  _train_args(tiny_model_dir, example_data_dir, tmp_path / "out", "--max_steps", "5"))
    err = capsys.readouterr().err
    assert rc == 130
    assert f"the newest checkpoint is {tmp_path / 'out' / 'checkpoints' / 'step-000002'}" in err
    assert "--resume_from_checkpoint latest" in err


def test_ctrl_c_in_generation_says_what_was_written(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from lora import inference_lora
    from lora.common.cli import run_main
    from lora.generation import engine

    real = engine._generate_batch
    calls = {"n": 0}

    def interrupt_second_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine, "_generate_batch", interrupt_second_batch)
    rc = run_main(inference_lora.main, ["--model_path", str(tiny_model_dir), "--lora_model_path", "none",
                                        "--prompts", "a", "b", "--batch_size", "1", "--duration", "0.3",
                                        "--output_dir", str(tmp_path / "gen")])
    err = capsys.readouterr().err
    assert rc == 130 and "1 of 2 file(s) were written" in err and "manifest.json" in err
    assert len(json.loads((tmp_path / "gen" / "manifest.json").read_text())["files"]) == 1


# ------------------------------------------------------------------------------------------
# Silent changes: mono data on a stereo model; a verdict from one held-out clip
# ------------------------------------------------------------------------------------------
def test_mono_clips_on_a_stereo_model_are_said_once(tiny_stereo_model_dir, example_data_dir,
                                                    tmp_path, caplog):
    from lora.config import ModelConfig
    from lora.dataprep.token_cache import build_token_cache
    from lora.dataset import load_metadata
    from lora.modeling.loading import load_base_model

    model, processor, info = load_base_model(ModelConfig(model_path=str(tiny_stereo_model_dir)))
    data = tmp_path / "data"
    shutil.copytree(example_data_dir, data, ignore=shutil.ignore_patterns("cache"))
    records = load_metadata(data)
    assert sf.info(records[0].path).channels == 1
    build_token_cache(records, model, processor, info, data, show_progress=False)
    lines = [r.message for r in caplog.records if "copied to both channels" in r.message]
    assert lines == [f"{len(records)} of {len(records)} clip(s) are mono but the model is stereo: "
                     f"each is copied to both channels, so there is no stereo image to learn "
                     f"(prepare the data with --channels 2 from stereo sources)"]


def test_one_held_out_clip_names_no_winner():
    from lora.scoring.report import summary_rows

    def results(n):
        lk = {m: {"ce": ce, "ppl": 2.0 ** ce, "n_clips": n} for m, ce in (("base", 7.5), ("lora", 6.9))}
        lk["difference"] = {"diff": -0.6, "ci_low": -0.7, "ci_high": -0.5, "confidence": 0.95, "n": n}
        return {"models_evaluated": ["base", "lora"], "likelihood": lk}

    assert {r["better"] for r in summary_rows(results(1))} == {"too few clips"}
    assert summary_rows(results(5))[0]["better"] == "LoRA"
    wide = results(5)
    wide["likelihood"]["difference"].update(ci_low=-0.7, ci_high=0.1)
    assert summary_rows(wide)[0]["better"] == "unclear"
