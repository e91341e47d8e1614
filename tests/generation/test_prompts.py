"""The prompts-file reader that inference_lora.py and evaluate.py share (lora.generation.prompts):
.txt, .json and .jsonl, with or without a byte-order mark, every problem named with its line."""

from __future__ import annotations

import json

import pytest

from lora.common.cli import UserError


def test_prompts_files_txt_json_jsonl(tmp_path):
    from lora.generation.prompts import read_prompts_file

    txt = tmp_path / "p.txt"
    txt.write_text("# my prompts\nlofi piano\n\n  dark techno  \n", encoding="utf-8")
    js = tmp_path / "p.json"
    js.write_text(json.dumps({"prompts": ["a", {"prompt": "b", "top_p": 0.9, "guidance_scale": 4}]}))
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"text": "c", "seed": 3, "num_samples": 2, "temperature": 0.8, "top_k": 100}\n')
    problems = []
    assert [e for _, e in read_prompts_file(txt, problems)] == [{"text": "lofi piano"},
                                                                {"text": "dark techno"}]
    assert [e for _, e in read_prompts_file(js, problems)] == [{"text": "a"},
                                                               {"text": "b", "top_p": 0.9,
                                                                "guidance_scale": 4.0}]
    assert [e for _, e in read_prompts_file(jl, problems)] == [
        {"text": "c", "seed": 3, "num_samples": 2, "temperature": 0.8, "top_k": 100}]
    assert problems == []


def test_one_prompt_file_reader_for_inference_and_evaluation(tmp_path):
    """inference_lora and evaluate read prompts files the same way: UTF-8 with or without a
    byte-order mark, 'text' / 'prompt' / 'caption' as the prompt's key, every problem collected and
    named."""
    from lora.generation.prompts import read_prompt_texts, read_prompts_file

    pf = tmp_path / "p.jsonl"
    pf.write_text('\ufeff{"caption": "lofi piano", "seed": 3}\n{"prompt": "dark techno"}\n',
                  encoding="utf-8")
    problems: list[str] = []
    assert [e for _, e in read_prompts_file(pf, problems)] == [{"text": "lofi piano", "seed": 3},
                                                              {"text": "dark techno"}]
    assert problems == [] and read_prompt_texts(pf) == ["lofi piano", "dark techno"]
    txt = tmp_path / "p.txt"
    txt.write_text("\ufeffambient pad\n", encoding="utf-8")
    assert read_prompt_texts(txt) == ["ambient pad"]  # the mark is not part of the first prompt
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "caption": "b"}\n{"genre": "x"}\n')
    with pytest.raises(UserError) as e:
        read_prompt_texts(bad)
    assert "bad.jsonl line 1: give one of 'text', 'caption'" in str(e.value)
    assert "bad.jsonl line 2: unknown key(s) 'genre'" in str(e.value)


def test_read_prompts_file_formats(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\nlofi piano\n\n  trap beat \n", encoding="utf-8")
    (tmp_path / "p.json").write_text(json.dumps(["a", {"prompt": "b"}]), encoding="utf-8")
    (tmp_path / "p.jsonl").write_text('{"text": "c"}\n"d"\n', encoding="utf-8")
    from lora.generation.prompts import read_prompt_texts

    assert read_prompt_texts(tmp_path / "p.txt") == ["lofi piano", "trap beat"]
    assert read_prompt_texts(tmp_path / "p.json") == ["a", "b"]
    assert read_prompt_texts(tmp_path / "p.jsonl") == ["c", "d"]
    (tmp_path / "bad.json").write_text("[1]", encoding="utf-8")

    with pytest.raises(UserError, match="bad.json item 1"):
        read_prompt_texts(tmp_path / "bad.json")
