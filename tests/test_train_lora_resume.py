"""--resume_from_checkpoint continues the run its checkpoint belongs to, and nothing else
(lora/training/resume.py): another base model, LoRA shape or optimizer setting is refused, naming the
difference; other data is refused unless --resume_with_changed_data, and then the run's history marks
the step where it changed; more steps continue, with the schedule re-planned and the change recorded.
And a run killed at any point leaves a folder that resumes or starts again, with advice that works.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # (whole training runs of the tiny model)


def _args(model, data, out, *extra):
    own = {"--max_steps": "2", "--gradient_accumulation_steps": "1", "--eval_steps": "1",
           "--save_steps": "1", "--logging_steps": "1", "--mixed_precision": "no",
           "--max_duration": "1"}
    args = ["--model_path", str(model), "--data_dir", str(data), "--output_dir", str(out)]
    for flag, value in own.items():
        if flag not in extra:
            args += [flag, value]
    return args + [str(a) for a in extra]


def _history(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def _snapshot(out: Path) -> dict:
    """The files a refused resume must leave as they were."""
    files = [out / "config.yaml", out / "logs" / "metrics.jsonl", out / "final_model" / "trainer_state.json",
             out / "best_model" / "adapter_model.safetensors"]
    return {f: f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def run2(tmp_path_factory, tiny_model_dir, example_data_dir):
    """A finished 2-step run (checkpoints at steps 1 and 2)."""
    from lora import train_lora

    out = tmp_path_factory.mktemp("resume") / "run"
    assert train_lora.main(_args(tiny_model_dir, example_data_dir, out)) == 0
    return out


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """Another dataset: the example set with fewer clips (other training and held-out clips)."""
    from lora import prepare_data

    out = tmp_path_factory.mktemp("other") / "data"
    assert prepare_data.main(["--create_example", "--output_dir", str(out), "--example_clips", "12",
                              "--example_seconds", "4"]) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("flags, named", [
    (["--lora_rank", "4"], "lora.lora_rank: the run has 12, this command 4"),
    (["--lora_targets", "attention_ffn"], 'lora.lora_targets: the run has "attention", this command '
                                          '"attention_ffn"'),
    (["--learning_rate", "0.001", "--warmup_steps", "3"],
     "training.learning_rate: the run has 0.0003, this command 0.001"),
])
def test_another_lora_shape_or_schedule_is_refused_naming_it(flags, named, run2, tmp_path, tiny_model_dir,
                                                             example_data_dir):
    """Today's main ends these in size-mismatch tracebacks (rank, targets) or silently keeps the
    checkpoint's learning rate while config.yaml claims the new one."""
    from lora import train_lora
    from lora.common.cli import UserError

    out = _copy(run2, tmp_path)
    before = _snapshot(out)
    with pytest.raises(UserError) as e:
        train_lora.main(_args(tiny_model_dir, example_data_dir, out, *flags,
                              "--resume_from_checkpoint", "latest"))
    assert named in str(e.value)
    if "--warmup_steps" in flags:
        assert "training.warmup_steps: the run has 100, this command 3" in str(e.value)
    assert _snapshot(out) == before


def test_another_base_model_is_refused_naming_both(run2, tmp_path, tiny_model_dir, tiny_stereo_model_dir,
                                                   example_data_dir):
    """Today's main exits 0 and records the stereo base although the steps before trained on mono."""
    from lora import train_lora
    from lora.common.cli import UserError

    out = _copy(run2, tmp_path)
    before = _snapshot(out)
    with pytest.raises(UserError) as e:
        train_lora.main(_args(tiny_stereo_model_dir, example_data_dir, out, "--resume_from_checkpoint",
                              "latest"))
    text = str(e.value)
    assert f"trained on the base model {tiny_model_dir}" in text
    assert f"this command loads {tiny_stereo_model_dir}" in text
    assert f"pass --model_path {tiny_model_dir}" in text
    assert _snapshot(out) == before


def test_changed_data_is_refused_unless_asked_and_then_marked(run2, tmp_path, tiny_model_dir,
                                                              example_data_dir, other_data):
    """Today's main resumes on other data without a word and draws the held-out losses of two
    different held-out sets as one curve."""
    from lora import train_lora
    from lora.common.cli import UserError

    out = _copy(run2, tmp_path)
    before = _snapshot(out)
    with pytest.raises(UserError) as e:
        train_lora.main(_args(tiny_model_dir, other_data, out, "--max_steps", "4",
                              "--resume_from_checkpoint", "latest"))
    text = str(e.value)
    assert "the data is not the run's" in text
    assert f"training clips: 12 in {example_data_dir} before, 8 in {other_data} now" in text
    assert "held-out clips: 4 in" in text and "--resume_with_changed_data" in text
    assert _snapshot(out) == before  # config.yaml and the history are the run's still

    assert train_lora.main(_args(tiny_model_dir, other_data, out, "--max_steps", "4",
                                 "--resume_from_checkpoint", "latest",
                                 "--resume_with_changed_data")) == 0
    history = _history(out)
    events = [h for h in history if h.get("event") == "resume"]
    assert len(events) == 1
    ev = events[0]
    assert ev["step"] == 2 and ev["train_data_changed"] and ev["heldout_changed"]
    assert ev["changed"]["data.data_dir"] == [str(example_data_dir), str(other_data)]
    assert ev["total_steps"] == [2, 4]
    after = history[history.index(ev) + 1:]
    # a new baseline on the new held-out clips (the adapter switched off), then the adapter on them
    assert after[0]["step"] == 2 and after[0]["base"] is True
    assert after[1]["step"] == 2 and not after[1].get("base")
    state = json.loads((out / "final_model" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["best_step"] >= 2  # best among the new clips' losses
    assert state["base_val_loss"] == after[0]["val_loss"]
    new_evals = [h["val_loss"] for h in after if "val_loss" in h and not h.get("base")]
    assert state["best_metric"] == min(new_evals)
    assert state["data"]["train"]["clips"] == 8
    config = (out / "config.yaml").read_text()
    assert "# resumed at step 2 from" in config and f"data_dir: {other_data}" in config


def test_more_steps_continue_on_a_re_planned_schedule_and_are_recorded(run2, tmp_path, tiny_model_dir,
                                                                        example_data_dir):
    """A 2-step run resumed to 4 steps trains steps 3 and 4 exactly as a 4-step run does (the
    schedule re-planned from the step reached), and the history says so."""
    from lora import train_lora

    out = _copy(run2, tmp_path)
    assert train_lora.main(_args(tiny_model_dir, example_data_dir, out, "--max_steps", "4",
                                 "--resume_from_checkpoint", "latest")) == 0
    ref = tmp_path / "ref"
    assert train_lora.main(_args(tiny_model_dir, example_data_dir, ref, "--max_steps", "4")) == 0
    got = {h["step"]: (h["lr"], h["loss"]) for h in _history(out) if "lr" in h}
    want = {h["step"]: (h["lr"], h["loss"]) for h in _history(ref) if "lr" in h}
    assert got[3] == pytest.approx(want[3], abs=1e-6) and got[4] == pytest.approx(want[4], abs=1e-6)
    events = [h for h in _history(out) if h.get("event") == "resume"]
    assert [(e["step"], e["total_steps"], e["train_data_changed"], e["heldout_changed"])
            for e in events] == [(2, [2, 4], False, False)]
    assert json.loads((out / "final_model" / "trainer_state.json").read_text())["total_steps"] == 4
    assert "max_steps: 4" in (out / "config.yaml").read_text()


def test_fewer_steps_than_done_are_refused(run2, tmp_path, tiny_model_dir, example_data_dir):
    from lora import train_lora
    from lora.common.cli import UserError

    out = _copy(run2, tmp_path)
    ck = out / "checkpoints" / "step-000002"
    with pytest.raises(UserError, match="the run is at step 2, but this command plans 1 steps"):
        train_lora.main(_args(tiny_model_dir, example_data_dir, out, "--max_steps", "1",
                              "--resume_from_checkpoint", ck))


def _interrupted_run(out, tiny_model_dir, example_data_dir, monkeypatch, capsys, at_step, *extra):
    """A run stopped by Ctrl-C in its ``at_step``-th training step (no checkpoint saved before it)."""
    from lora import train_lora
    from lora.common.cli import run_main
    from lora.training import step

    real, calls = step.step_loss, {"n": 0}

    def interrupt(model, *a, **k):
        if model.training:
            calls["n"] += 1
            if calls["n"] == at_step:
                raise KeyboardInterrupt
        return real(model, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(step, "step_loss", interrupt)
        rc = run_main(train_lora.main, _args(tiny_model_dir, example_data_dir, out, "--max_steps", "4",
                                             "--save_steps", "100", *extra))
    assert rc == 130
    return capsys.readouterr().err


def test_a_run_stopped_before_it_trained_starts_again(tmp_path, tiny_model_dir, example_data_dir,
                                                      monkeypatch, capsys):
    """Killed after the step-0 validation wrote best_model/, before any checkpoint: today's main
    refuses a plain rerun (advising a resume) and then the resume (advising a plain run)."""
    from lora import train_lora
    from lora.common.cli import UserError

    out = tmp_path / "run"
    err = _interrupted_run(out, tiny_model_dir, example_data_dir, monkeypatch, capsys, 1)
    assert (out / "best_model").is_dir() and not (out / "checkpoints").exists()
    assert "run the same command again to start over" in err
    with pytest.raises(UserError, match="Run the same command without --resume_from_checkpoint"):
        train_lora.main(_args(tiny_model_dir, example_data_dir, out, "--max_steps", "4",
                              "--resume_from_checkpoint", "latest"))
    # the advice, followed: the same command
    assert train_lora.main(_args(tiny_model_dir, example_data_dir, out, "--max_steps", "4",
                                 "--save_steps", "100")) == 0
    assert json.loads((out / "final_model" / "trainer_state.json").read_text())["global_step"] == 4


def test_a_run_that_trained_without_a_checkpoint_says_how_to_start_over(tmp_path, tiny_model_dir,
                                                                        example_data_dir, monkeypatch,
                                                                        capsys):
    """best_model/ holds trained steps but there is no checkpoint: a plain rerun must not delete it
    unasked, and the message names the way that works."""
    from lora import train_lora
    from lora.common.cli import UserError

    out = tmp_path / "run"
    _interrupted_run(out, tiny_model_dir, example_data_dir, monkeypatch, capsys, 3,
                     "--learning_rate", "0.003")
    best = json.loads((out / "best_model" / "trainer_state.json").read_text())["global_step"]
    assert best in (1, 2)  # it trained (steps 1 and 2 ran, each validated)
    with pytest.raises(UserError) as e:
        train_lora.main(_args(tiny_model_dir, example_data_dir, out, "--max_steps", "4",
                              "--learning_rate", "0.003"))
    text = str(e.value)
    assert f"trained to step {best}" in text and "no checkpoint to resume from" in text
    assert "--resume_from_checkpoint" not in text and "--overwrite_output_dir" in text
    assert (out / "best_model").is_dir()  # nothing deleted unasked
    assert train_lora.main(_args(tiny_model_dir, example_data_dir, out, "--max_steps", "4",
                                 "--overwrite_output_dir")) == 0


def test_a_fresh_run_into_a_resumable_folder_names_its_state(run2, tmp_path, tiny_model_dir,
                                                             example_data_dir):
    from lora import train_lora
    from lora.common.cli import UserError

    out = _copy(run2, tmp_path)
    with pytest.raises(UserError) as e:
        train_lora.main(_args(tiny_model_dir, example_data_dir, out))
    text = str(e.value)
    assert "its newest checkpoint is at step 2 of 2" in text
    # a new run in another folder is offered first; resuming says what it keeps
    assert text.index("another --output_dir") < text.index("--resume_from_checkpoint latest")
    assert "a difference is refused, named" in text
