"""The web UI's generation engine (lora.webui.engine) without a browser or a model: the Generate
form's checks, the requests it makes and the inference_lora.py command it shows (what reproduce.sh
holds: inference_lora.py must read it back as the same settings and build the same requests), and
the clean-up of old UI outputs, which deletes only the folders the UI made. The browser tests:
tests/webui/test_app.py."""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import time

import pytest

from lora import inference_lora
from lora.common.cli import UserError
from lora.config import Config, parse_config
from lora.webui import engine as E


def _form(**changes) -> E.GenForm:
    form = E.GenForm(prompts="lofi piano\n\n  dark techno  \n", model_path="tiny",
                     adapter=["/runs/a/best_model", "/runs/b/best_model"], lora_scale="0.7, 0.4",
                     duration=2.5, guidance_scale=4.0, temperature=0.9, top_k=100, top_p=0.9,
                     seed="17", num_samples=2, audio_prompt=None, mode=E.MODES[0])
    return dataclasses.replace(form, **changes)


@pytest.fixture
def two_adapters(tmp_path, tiny_adapter_dir) -> list[str]:
    """Two adapter folders trained on the same base (copies of one)."""
    return [str(shutil.copytree(tiny_adapter_dir, tmp_path / name / "best_model")) for name in "ab"]


def _shown_command(form: E.GenForm, tmp_path, **generation):
    """The command the UI shows for the fine-tune side, and the settings it was made from."""
    g = dataclasses.replace(Config().generation, dtype="float32", decoding="static", batch_size=3,
                            max_window=20.0, extend_stride=12.0, **generation)
    adapters = E.adapter_list(form.adapter)
    side = E.Side("fine-tune", tmp_path / "job" / "fine-tune", adapters,
                  E.strengths(form, len(adapters)))
    return E.cli_command(form, g, side, E.parse_seed(form.seed)), g


def test_the_shown_command_is_read_back_by_inference_lora_as_the_forms_settings(tmp_path):
    form = _form()
    command, g = _shown_command(form, tmp_path)
    words = shlex.split(command)
    assert words[:2] == ["python", "lora/inference_lora.py"]
    cfg, _ = parse_config(words[2:], sections=("generation", "model"))
    got = cfg.generation
    assert got.prompts == ["lofi piano", "dark techno"] and cfg.model.model_path == "tiny"
    assert (got.seed, got.num_samples, got.duration, got.guidance_scale, got.temperature, got.top_k,
            got.top_p) == (17, 2, 2.5, 4.0, 0.9, 100, 0.9)
    assert (got.batch_size, got.max_window, got.extend_stride, got.dtype, got.decoding) == (
        3, 20.0, 12.0, "float32", "static")
    assert got.lora_model_path == ["/runs/a/best_model", "/runs/b/best_model"]
    assert got.lora_scale == [0.7, 0.4] and got.merge is False  # the UI never merges
    assert got.output_dir == str(tmp_path / "job" / "fine-tune" / "cli")


def test_the_ui_generates_the_requests_inference_lora_builds_from_that_command(tmp_path):
    """Seeds seed, seed+1, ... for each prompt, with the form's sampling settings: the files of
    reproduce.sh are the UI's files."""
    form = _form()
    command, _ = _shown_command(form, tmp_path)
    cfg, _ = parse_config(shlex.split(command)[2:], sections=("generation", "model"))
    problems: list[str] = []
    specs = inference_lora.build_prompt_specs(cfg.generation, problems)
    assert problems == []
    cli = [(s.text, s.seed + j, s.duration, s.sampling) for s in specs for j in range(s.num_samples)]
    ui = [(r.prompt, r.seed, r.duration, r.sampling) for r in E.make_requests(form, 17)]
    assert ui == cli and [seed for _, seed, _, _ in ui] == [17, 18, 17, 18]


def test_each_sides_command_uses_that_sides_adapters(tmp_path, two_adapters):
    """inference_lora.py picks the adapters the command names: both (with their strengths) for the
    fine-tune side, none for the base side (not the default output/best_model); the audio prompt
    kept with the job is passed on."""
    form = _form(adapter=two_adapters)
    g = dataclasses.replace(Config().generation, audio_prompt=str(tmp_path / "job" / "intro.wav"))
    for side, want in ((E.Side("fine-tune", tmp_path / "job" / "fine-tune", two_adapters, [0.7, 0.4]),
                        two_adapters),
                       (E.Side("base", tmp_path / "job" / "base", []), [])):
        argv = shlex.split(E.cli_command(form, g, side, 5))[2:]
        cfg, _ = parse_config(argv, sections=("generation", "model"))
        problems: list[str] = []
        assert inference_lora.choose_adapter(cfg.generation, argv, problems) == (want, False)
        assert problems == [] and cfg.generation.audio_prompt == str(tmp_path / "job" / "intro.wav")


def test_a_good_form_has_no_problems_and_each_bad_field_is_named(two_adapters):
    assert E.form_problems(_form(adapter=two_adapters)) == []
    assert E.form_problems(_form(mode=E.MODES[2], adapter=[])) == []  # base only needs no adapter
    bad = _form(prompts=" \n", duration=0, top_p=1.5, num_samples=0, temperature=0)
    problems = "\n".join(E.form_problems(bad))
    for word in ("Write a prompt", "duration", "top_p", "num_samples", "temperature"):
        assert word in problems, (word, problems)
    assert "needs an adapter" in "\n".join(E.form_problems(_form(adapter=[E.NO_ADAPTER])))
    assert "not a list of numbers" in "\n".join(E.form_problems(_form(lora_scale="strong")))
    # a mix is checked before anything loads: a missing folder is named
    missing = "\n".join(E.form_problems(_form(adapter=[two_adapters[0], "/no/such/adapter"])))
    assert "/no/such/adapter" in missing


def test_seed_box_and_strengths_box():
    assert E.parse_seed("12") == 12 and E.parse_seed(" 4294967295 ") == 2 ** 32 - 1
    for bad in ("3.0", "-1", "4294967296"):  # the scripts' one rule for seeds (--seed 3.0 is refused too)
        with pytest.raises(UserError, match="seed must be a whole number"):
            E.parse_seed(bad)
    assert 0 <= E.parse_seed("random") < 2 ** 31 and 0 <= E.parse_seed("") < 2 ** 31
    with pytest.raises(UserError, match="seed must be a whole number"):
        E.parse_seed("twelve")
    assert E.strengths(_form(lora_scale="0.7, 0.4"), 2) == [0.7, 0.4]
    assert E.strengths(_form(lora_scale=1), 2) == [1.0, 1.0]  # a single 1 serves every adapter
    with pytest.raises(UserError, match="Adapter strengths"):
        E.strengths(_form(lora_scale="0.5, 0.5, 0.5"), 2)
    with pytest.raises(UserError, match="give one strength per adapter"):
        E.strengths(_form(lora_scale=" "), 1)


def _job(root, name: str, size: int, age_s: float):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "x.wav").write_bytes(b"\0" * size)
    t = time.time() - age_s
    os.utime(folder, (t, t))
    return folder


def test_clean_up_deletes_old_then_oldest_ui_folders_and_nothing_else(tmp_path):
    ui = tmp_path / "ui"
    old = _job(ui, "gen-1", 10, age_s=3 * 86400)
    older_big = _job(ui, "gen-2", 5000, age_s=3600)
    newer_big = _job(ui, "gen-3", 5000, age_s=60)
    current = _job(ui, "gen-4", 5000, age_s=7200)  # the job being shown: kept whatever its age
    mine = _job(ui, "my-notes", 10, age_s=10 * 86400)  # not made by the UI
    # (keep: a path the request being served uses, e.g. the job's own file)
    gone = E.clean_ui_outputs(ui, max_age_s=86400, max_bytes=6000, keep=[current / "x.wav"])
    assert gone == [old, older_big]  # too old; then the oldest while over the budget
    assert sorted(p.name for p in ui.iterdir()) == ["gen-3", "gen-4", "my-notes"]
    assert newer_big.is_dir() and mine.is_dir() and current.is_dir()
    assert E.clean_ui_outputs(tmp_path / "none", 1, 1) == []
