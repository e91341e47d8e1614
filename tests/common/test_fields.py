"""The settings machinery (lora.common.fields) the scripts' flags and config.yaml go through: a
config file that is not UTF-8 names the file and line, a key under the wrong section names its
section, a flag given twice is refused (a list flag keeps every value). The schema itself:
tests/test_config.py."""

from __future__ import annotations

import pytest


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
    # (the scripts log at INFO: set here too, so the test does not depend on a script run before it)
    with caplog.at_level("INFO", logger="lora"):
        cfg, _ = parse_config(["--prompts", "a", "--prompts", "b", "c"],
                              sections=("generation", "model"))
    assert cfg.generation.prompts == ["a", "b", "c"] and "all of its values are used" in caplog.text
