"""The file checks every script shares (lora.common.files): an --output_dir that is a file is a
message, and the file is not changed."""

from __future__ import annotations

import pytest

from tests.helpers import train_args


@pytest.mark.parametrize("script", ["train_lora", "inference_lora", "evaluate"])
def test_an_output_dir_that_is_a_file_is_a_message_and_nothing_changes(script, tmp_path, tiny_model_dir,
                                                                       example_data_dir):
    from lora import evaluate, inference_lora, train_lora
    from lora.common.cli import UserError

    target = tmp_path / "taken"
    target.write_text("my file")
    args = {"train_lora": train_args(tiny_model_dir, example_data_dir, target),
            "inference_lora": ["--model_path", str(tiny_model_dir), "--lora_model_path", "none",
                               "--prompts", "x", "--output_dir", str(target)],
            "evaluate": ["--model_path", str(tiny_model_dir), "--lora_model_path", "none", "--data_dir",
                         str(example_data_dir), "--output_dir", str(target)]}[script]
    main = {"train_lora": train_lora.main, "inference_lora": inference_lora.main,
            "evaluate": evaluate.main}[script]
    with pytest.raises(UserError, match=f"{target}.*is a file, not a folder"):
        main(args)
    assert target.read_text() == "my file"
