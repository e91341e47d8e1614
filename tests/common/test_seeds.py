"""One rule for seeds in every script and the UI (lora.config: SEED_RANGE on every seed setting,
seed_problem for the seeds a run derives from the first): a whole number from 0 to 2^32-1, the last
sample's seed included; anything else is a message, never a traceback nor a silent wrap-around."""

from __future__ import annotations

import pytest

from lora.common.cli import UserError

BAD = ["-1", str(2 ** 32), str(10 ** 30)]


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("script", ["train_lora", "inference_lora", "evaluate", "prepare_data", "ui"])
def test_every_seed_outside_0_to_2_32_is_refused_with_one_message(script, value, tmp_path, tiny_model_dir,
                                                                  example_data_dir):
    import importlib

    if script == "ui":
        from lora.webui.engine import parse_seed

        with pytest.raises(UserError, match="4294967295"):
            parse_seed(value)
        return
    argv = {"train_lora": ["--model_path", str(tiny_model_dir), "--data_dir", str(example_data_dir),
                           "--output_dir", str(tmp_path / "o"), "--seed", value],
            "inference_lora": ["--base_model_path", str(tiny_model_dir), "--lora_model_path", "none",
                               "--prompts", "x", "--output_dir", str(tmp_path / "o"), "--seed", value],
            "evaluate": ["--base_model_path", str(tiny_model_dir), "--lora_model_path", "none",
                         "--data_dir", str(example_data_dir), "--output_dir", str(tmp_path / "o"),
                         "--seed", value],
            "prepare_data": ["--create_example", "--output_dir", str(tmp_path / "o"), "--split_seed",
                             value]}[script]
    with pytest.raises(UserError, match=r"seed must be .*4294967295"):
        importlib.import_module(f"lora.{script}").main(argv)
    assert not (tmp_path / "o").exists()


def test_the_last_samples_seed_is_a_seed_too(tmp_path, tiny_model_dir):
    from lora import inference_lora
    from lora.webui.engine import parse_seed

    with pytest.raises(UserError, match="would use 4294967296"):
        inference_lora.main(["--base_model_path", str(tiny_model_dir), "--lora_model_path", "none",
                             "--prompts", "x", "--output_dir", str(tmp_path / "o"), "--num_samples", "2",
                             "--seed", str(2 ** 32 - 1)])
    assert parse_seed(str(2 ** 32 - 2), 2) == 2 ** 32 - 2
    with pytest.raises(UserError, match="would use 4294967296"):
        parse_seed(str(2 ** 32 - 2), 3)
