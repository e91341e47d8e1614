"""The one config schema: precedence, flags generated from it, clear errors, config.yaml kept in
step."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
import yaml

from lora import config
from lora.common import fields as common_fields
from lora.common.fields import ConfigError
from lora.config import parse_config
from tests.helpers import ROOT

TRAIN = ("training", "model", "lora", "data")


def test_config_yaml_lists_every_key_with_its_default_and_a_comment():
    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    assert set(data) == set(config.SECTIONS)
    for name, cls in config.SECTIONS.items():
        defaults = cls()
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(data[name]) == fields, f"config.yaml section {name} differs from the schema"
        for key in fields:
            want = getattr(defaults, key)
            got = data[name][key]
            if isinstance(want, float):
                assert float(got) == pytest.approx(want), f"{name}.{key}"
            else:
                assert got == want, f"{name}.{key}: config.yaml has {got!r}, schema default {want!r}"
    # every key line carries a comment
    for line in (ROOT / "config.yaml").read_text().splitlines():
        if re.match(r"^  \w+:", line):
            assert "#" in line, f"config.yaml line without a comment: {line!r}"


def test_seed_defaults():
    cfg, _ = parse_config([], sections=TRAIN)
    assert (cfg.lora.lora_rank, cfg.lora.lora_alpha, cfg.lora.lora_dropout) == (12, 24.0, 0.1)
    t = cfg.training
    assert (t.learning_rate, t.batch_size, t.gradient_accumulation_steps, t.num_epochs,
            t.warmup_steps) == \
        (3e-4, 2, 4, 5.0, 100)
    assert cfg.data.sample_rate == 32000


def test_precedence_defaults_yaml_flags(tmp_path):
    y = tmp_path / "my.yaml"
    y.write_text("training:\n  learning_rate: 1e-4\n  batch_size: 8\nlora:\n  lora_rank: 4\n")
    cfg, _ = parse_config(["--config", str(y), "--batch_size", "3"], sections=TRAIN)
    assert cfg.training.learning_rate == 1e-4  # yaml over default
    assert cfg.training.batch_size == 3  # flag over yaml
    assert cfg.lora.lora_rank == 4
    assert cfg.lora.lora_alpha == 24.0  # default kept
    assert cfg.config_file == str(y.resolve())


def test_unknown_yaml_key_is_named_with_suggestion(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("training:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"training\.learning_rat.*learning_rate"):
        parse_config(["--config", str(y)], sections=TRAIN)
    y.write_text("trainig:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"section 'trainig'.*training"):
        parse_config(["--config", str(y)], sections=TRAIN)


def test_wrong_types_are_named(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("training:\n  batch_size: two\n")
    with pytest.raises(ConfigError, match=r"training\.batch_size.*integer.*'two'"):
        parse_config(["--config", str(y)], sections=TRAIN)
    with pytest.raises(ConfigError, match=r"--lora_rank.*integer"):
        parse_config(["--lora_rank", "x"], sections=TRAIN)
    with pytest.raises(ConfigError, match=r"mixed_precision.*auto, fp16, bf16, no"):
        parse_config(["--mixed_precision", "fp8"], sections=TRAIN)


def test_unknown_flag_suggests_close_match():
    with pytest.raises(ConfigError, match=r"--lora_rnk.*did you mean --lora_rank"):
        parse_config(["--lora_rnk", "3"], sections=TRAIN)


def test_seed_flags_are_accepted():
    cfg, _ = parse_config(["--model_path", "tiny", "--data_dir", "d", "--metadata_file", "m.json",
                           "--output_dir", "o", "--lora_rank", "12", "--lora_alpha", "24",
                           "--batch_size", "2",
                           "--num_epochs", "5", "--fp16", "--learning_rate", "1e-3",
                           "--warmup_steps", "5",
                           "--gradient_accumulation_steps", "2", "--save_steps", "7", "--eval_steps", "3",
                           "--logging_steps", "1", "--max_steps", "9", "--save_total_limit", "2",
                           "--resume_from_checkpoint", "latest", "--gradient_checkpointing",
                           "--seed", "5"],
                          sections=TRAIN)
    assert cfg.training.mixed_precision == "fp16"
    assert cfg.training.output_dir == os.path.abspath("o")  # training owns --output_dir here
    assert cfg.data.data_dir == os.path.abspath("d")
    assert cfg.model.model_path == "tiny"
    assert cfg.training.gradient_checkpointing is True and cfg.training.max_steps == 9
    gen, _ = parse_config(["--base_model_path", "facebook/musicgen-small", "--lora_model_path", "x",
                           "--prompts", "hip hop 808 beat with trap drums", "b"],
                          sections=("generation", "model"))
    assert gen.model.model_path == "facebook/musicgen-small"  # a hub id is not turned into a path
    assert gen.generation.prompts == ["hip hop 808 beat with trap drums", "b"]


def test_relative_paths_work_from_repo_root_and_from_lora(monkeypatch):
    monkeypatch.chdir(ROOT / "lora")
    cfg, _ = parse_config(["--data_dir", "../data"], sections=TRAIN)
    assert cfg.data.data_dir == str(ROOT / "data")
    # defaults are relative to the repository root wherever we run from
    assert cfg.training.output_dir == str(ROOT / "output")
    monkeypatch.chdir(ROOT)
    cfg, _ = parse_config(["--data_dir", "data"], sections=TRAIN)
    assert cfg.data.data_dir == str(ROOT / "data")


def test_yaml_paths_are_relative_to_the_yaml_file(tmp_path, monkeypatch):
    (tmp_path / "proj").mkdir()
    y = tmp_path / "proj" / "c.yaml"
    y.write_text("data:\n  data_dir: mydata\n")
    monkeypatch.chdir(ROOT)
    cfg, _ = parse_config(["--config", str(y)], sections=TRAIN)
    assert cfg.data.data_dir == str(tmp_path / "proj" / "mydata")


def test_fp16_and_bf16_conflict():
    with pytest.raises(ConfigError, match="--fp16 and --bf16"):
        parse_config(["--fp16", "--bf16"], sections=TRAIN)


def test_resolved_config_round_trips(tmp_path):
    cfg, _ = parse_config(["--lora_rank", "7"], sections=TRAIN)
    path = cfg.save(tmp_path / "config.yaml")
    data = yaml.safe_load(path.read_text())
    assert data["lora"]["lora_rank"] == 7
    # the saved file is itself a valid config
    cfg2, _ = parse_config(["--config", str(path)], sections=TRAIN)
    assert cfg2.lora.lora_rank == 7


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="Config file not found"):
        parse_config(["--config", str(tmp_path / "nope.yaml")], sections=TRAIN)


# ------------------------------------------------------------------------------------------
# Ranges: declared once in the schema, checked for YAML and flags together, all problems at once
# ------------------------------------------------------------------------------------------
def test_out_of_range_values_from_yaml_and_flags_are_reported_together(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("training:\n  batch_size: 0\n  cond_dropout: 1.0\ngeneration:\n  top_p: 2\n"
                 "evaluation:\n  bootstrap_samples: 10\n")
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(y), "--lora_rank", "0", "--max_steps", "0"], sections=TRAIN)
    msg = str(e.value)
    for text in ("training.batch_size must be at least 1 (got 0)",
                 "training.cond_dropout must be in [0, 1) (got 1)",
                 "generation.top_p must be in [0, 1] (got 2)",
                 "evaluation.bootstrap_samples must be at least 100",
                 "lora.lora_rank must be at least 1 (got 0); 8-32 is typical",
                 "training.max_steps must be at least 1, or -1 (got 0); -1 = use num_epochs"):
        assert text in msg, (text, msg)
    # the allowed special value and the edges of each range pass
    cfg, _ = parse_config(["--max_steps", "-1", "--cond_dropout", "0", "--lora_rank", "1",
                           "--decoder_dropout", "null"], sections=TRAIN)
    assert cfg.training.max_steps == -1 and cfg.training.decoder_dropout is None


def test_a_script_rule_is_reported_with_the_range_problems():
    with pytest.raises(ConfigError) as e:
        parse_config(["--batch_size", "0"], sections=TRAIN, rules=lambda cfg,
                     ns: ["a rule between two settings"])
    assert "training.batch_size" in str(e.value) and "a rule between two settings" in str(e.value)


def test_every_numeric_setting_declares_its_range_and_the_reference_shows_it():
    """A number with no declared range would take any value unchecked; the USAGE reference lists
    each range."""
    import typing

    free = {("generation", "seed"), ("training", "seed"), ("data", "split_seed"),
            ("generation", "temperature")}
    ref = config.markdown_reference()
    for section, cls in config.SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            base, _ = common_fields._base_type(hints[f.name])
            if base in (int, float) and (section, f.name) not in free and not f.metadata.get("choices"):
                assert common_fields.range_text(f.metadata), f"{section}.{f.name} declares no range"
                assert f"(range: {common_fields.range_text(f.metadata)})" in ref, f"{section}.{f.name}"


def test_example_clips_minimum_matches_the_example_styles():
    from lora.dataprep.example_data import STYLES

    f = next(f for f in dataclasses.fields(config.DataConfig) if f.name == "example_clips")
    assert f.metadata["ge"] == 2 * len(STYLES) and f"{len(STYLES)} styles" in f.metadata["hint"]


def test_per_prompt_settings_are_checked_against_the_same_ranges(tmp_path):
    from lora.inference_lora import build_prompt_specs

    pf = tmp_path / "p.jsonl"
    pf.write_text('{"text": "a", "guidance_scale": 0.5}\n{"text": "b", "top_k": -1, "num_samples": 0}\n'
                  '{"text": "c", "temperature": 0}\n{"text": "d", "duration": 20}\n')
    cfg, _ = parse_config(["--prompts_file", str(pf)], sections=("generation", "model"))
    problems: list[str] = []
    specs = build_prompt_specs(cfg.generation, problems)
    assert [s.text for s in specs] == ["d"] and specs[0].duration == 20
    text = "\n".join(problems)
    assert "p.jsonl line 1: guidance_scale must be >= 1 (got 0.5)" in text
    assert "p.jsonl line 2: top_k must be at least 0 (got -1)" in text
    assert "p.jsonl line 2: num_samples must be at least 1 (got 0)" in text
    assert "p.jsonl line 3: temperature must be > 0" in text
