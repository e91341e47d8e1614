"""A hand-edited adapter_config.json is a message naming the file, before any model loads (lora/modeling/
adapter.py: check_adapter_files, check_adapter_fits, peft_errors), in every script that reads an adapter;
another peft type (IA3: USAGE says non-LoRA adapters are refused) included."""

from __future__ import annotations

import json
import shutil

import pytest

from lora.common.cli import UserError

EDITS = {
    "rank_zero": {"r": 0},
    "rank_not_the_weights": {"r": 16},
    "rank_not_a_number": {"r": "twelve"},
    "targets_that_do_not_exist": {"target_modules": ["no_such_layer"]},
    "ia3": {"peft_type": "IA3"},
    "unknown_setting_for_peft": {"lora_alpha": {"x": 1}},
}


@pytest.mark.parametrize("script", ["inference_lora", "export_model", "evaluate"])
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_a_hand_edited_adapter_config_is_a_message_naming_it(edit, script, tmp_path, tiny_model_dir,
                                                              trained_output_dir, example_data_dir):
    import importlib

    adapter = tmp_path / "adapter"
    shutil.copytree(trained_output_dir / "best_model", adapter)
    cfg_file = adapter / "adapter_config.json"
    cfg_file.write_text(json.dumps(dict(json.loads(cfg_file.read_text()), **EDITS[edit])))
    out = tmp_path / "out"
    argv = {"inference_lora": ["--prompts", "x", "--duration", "0.5"],
            "export_model": [],
            "evaluate": ["--compare", "--skip_generation", "--data_dir", str(example_data_dir)]}[script]
    main = importlib.import_module(f"lora.{script}").main
    with pytest.raises(UserError) as e:
        main(["--base_model_path", str(tiny_model_dir), "--lora_model_path", str(adapter),
              "--output_dir", str(out), *argv])
    assert str(cfg_file) in str(e.value), str(e.value)
    assert not out.exists() or not any(out.glob("*.wav")) and not (out / "model.safetensors").exists()
