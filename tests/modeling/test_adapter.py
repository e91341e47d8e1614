"""LoRA adapters (lora.modeling.adapter): attached to the targets asked for, saved as a standard
PEFT adapter that plain peft loads, loaded with the checks that it fits the base model; several
adapters at once (peft's multi-adapter machinery), adapters made by other peft-based trainers, what
cannot fit, the start-up line that says which model and adapter(s) generate, and a scale of 0 that
is the base model exactly (DoRA too). Tiny models, CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lora.common.cli import UserError
from lora.common.fields import ConfigError
from lora.config import LoraSection
from lora.modeling.adapter import attach_lora, load_lora
from lora.modeling.musicgen import build_delay_pattern, encode_text
from lora.scoring import generated, likelihood
from tests.helpers import generation_config, load_model, random_adapter

PROMPT = "techno drum loop"


def _cfg(model_dir, adapters=None, scales=None, **gen):
    """fp32: exact comparisons (merged vs unmerged holds in float32); ``scales``: one lora_scale per
    adapter."""
    if scales is not None:
        gen = {"lora_scale": scales if len(scales) > 1 else scales[0], **gen}
    return generation_config(model_dir, **{"dtype": "float32", **gen})


def _codes(model_dir, adapters, scales=None, greedy=False, **gen):
    """Tokens of one sample (sampled; ``greedy`` for comparisons of merged vs unmerged weights,
    which agree to fp32 rounding: a sampled token whose uniform draw falls within that rounding of a
    boundary may flip, an argmax hardly ever)."""
    from lora.generation.engine import generate
    from lora.generation.model import load_generation_model
    from lora.generation.requests import Request, SamplingSettings

    model, processor, info, adapter_info = load_generation_model(_cfg(model_dir, adapters, scales, **gen),
                                                                 adapter_path=adapters)
    req = Request(prompt=PROMPT, seed=3, duration=1.0, sampling=SamplingSettings(do_sample=not greedy))
    return generate(model, processor, info, [req], progress=False)[0].codes, adapter_info


def _peft_adapter(model_dir, out_dir, seed, recorded="same", **config):
    """An adapter made the way another peft-based trainer would: peft's LoraConfig + get_peft_model
    on the plain transformers model, every LoRA matrix random, saved with save_pretrained;
    ``recorded`` rewrites its base_model_name_or_path (None: not recorded)."""
    from peft import LoraConfig, get_peft_model
    from transformers import MusicgenForConditionalGeneration

    model = MusicgenForConditionalGeneration.from_pretrained(str(model_dir))
    peft_model = get_peft_model(model, LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    for _name, p in peft_model.named_parameters():
        if p.requires_grad:
            p.data = p.data + torch.randn(p.shape, generator=g) * 0.3
    peft_model.save_pretrained(str(out_dir))
    cfg_file = Path(out_dir) / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    if recorded != "same":
        cfg["base_model_name_or_path"] = recorded
        cfg_file.write_text(json.dumps(cfg))
    return Path(out_dir)


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    a = random_adapter(tiny_model_dir, root / "a", seed=1)
    b = random_adapter(tiny_model_dir, root / "b", seed=2, lora_rank=4, lora_alpha=8,
                        lora_targets="attention_ffn")  # another rank and other layers
    return a, b


# --------------------------------------------------------------------------------------------
# Mixing
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_mix_scales_one_zero_is_a_alone_and_zero_zero_is_the_base(tiny_model_dir, two_adapters):
    """An adapter at scale 0 adds nothing: the mix is the other adapter alone, token for token,
    merged or not. (Each is compared with the single adapter loaded the same way: a merged and an
    unmerged model differ by float rounding, and one sampled token of the clip flipped on that once,
    on the AMD EPYC.)"""
    a, b = two_adapters
    base, _ = _codes(tiny_model_dir, None)
    for merge in (False, True):
        alone, _ = _codes(tiny_model_dir, [a], merge=merge)
        assert not torch.equal(alone, base)
        ten, info = _codes(tiny_model_dir, [a, b], [1.0, 0.0], merge=merge)
        assert torch.equal(ten, alone)
        zero, _ = _codes(tiny_model_dir, [a, b], [0.0, 0.0], merge=merge)
        assert torch.equal(zero, base)
        b_alone, _ = _codes(tiny_model_dir, [b], merge=merge)
        zero_one, _ = _codes(tiny_model_dir, [a, b], [0.0, 1.0], merge=merge)
        assert torch.equal(zero_one, b_alone) and not torch.equal(zero_one, alone)
    assert [x["scale"] for x in info["adapters"]] == [1.0, 0.0]
    assert [x["path"] for x in info["adapters"]] == [str(a.resolve()), str(b.resolve())]
    assert all(len(x["weights_sha256"]) == 64 for x in info["adapters"])


@pytest.mark.slow
def test_mix_merged_equals_unmerged_and_is_the_sum_of_each_adapters_update(tiny_model_dir, two_adapters):
    """The mix at (0.7, 0.4), unmerged (peft adds each active adapter's update) and merged
    (merge_and_unload), gives the same logits as merging A at 0.7 and then B at 0.4 one after the
    other with peft: the sum of the two scaled updates, nothing else."""
    from peft import PeftModel

    from lora.modeling import adapter
    from lora.modeling.loading import load_base_model

    a, b = two_adapters
    cfg = _cfg(tiny_model_dir)
    codes = torch.randint(0, 128, (1, 4, 20))
    ids = {"input_ids": torch.tensor([[3, 5, 7, 1]]),
           "attention_mask": torch.ones(1, 4, dtype=torch.long)}

    def logits(model):
        with torch.no_grad():
            return model(**ids, decoder_input_ids=codes.reshape(4, 20)).logits

    model, _, _ = load_base_model(cfg.model)
    base_logits = logits(model)
    mixed, _ = adapter.load_adapters(model, [a, b], [0.7, 0.4])
    unmerged = logits(mixed)
    merged = logits(adapter.merge_lora(mixed))

    ref, _, _ = load_base_model(cfg.model)
    for path, scale in ((a, 0.7), (b, 0.4)):
        one = PeftModel.from_pretrained(ref, str(path))
        adapter.set_lora_scale(one, scale)
        ref = one.merge_and_unload()
    expected = logits(ref)
    torch.testing.assert_close(unmerged, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    assert (unmerged - base_logits).abs().max() > 1e-2  # the mix changes the model


@pytest.mark.slow
def test_mix_from_the_command_line_records_each_adapter(tiny_model_dir, two_adapters, tmp_path, caplog):
    from lora import inference_lora

    a, b = two_adapters
    out = tmp_path / "gen"
    with caplog.at_level("INFO", logger="lora"):
        assert inference_lora.main(["--model_path", str(tiny_model_dir), "--lora_model_path",
                                    str(a), str(b),
                                    "--lora_scale", "0.7", "0.4", "--prompts", PROMPT, "--duration",
                                    "0.5", "--output_dir", str(out)]) == 0
    entry = json.loads((out / "manifest.json").read_text())["files"][0]
    assert [(x["path"], x["scale"]) for x in entry["adapter"]["adapters"]] == [(str(a.resolve()), 0.7),
                                                                              (str(b.resolve()), 0.4)]
    assert entry["settings"]["lora_scale"] == [0.7, 0.4] and entry["adapter"]["merged"] is False
    assert f"+ adapter {a} (scale 0.7) + adapter {b} (scale 0.4)" in caplog.text


@pytest.mark.slow
def test_mix_in_config_yaml(tiny_model_dir, two_adapters, tmp_path):
    from lora.config import adapter_paths, adapter_scales, parse_config

    a, b = two_adapters
    y = tmp_path / "c.yaml"
    y.write_text(f"generation:\n  lora_model_path: [{a}, {b}]\n  lora_scale: [0.7, 0.4]\n")
    cfg, _ = parse_config(["--config", str(y)], sections=("generation", "model"))
    assert adapter_paths(cfg.generation) == [str(a), str(b)]
    assert adapter_scales(cfg.generation, 2) == [0.7, 0.4]
    y.write_text(f"generation:\n  lora_model_path: [{a}, {b}]\n  lora_scale: [0.7, -1]\n")
    with pytest.raises(ConfigError, match=r"generation.lora_scale\[1\] must be >= 0"):
        parse_config(["--config", str(y)], sections=("generation", "model"))
    with pytest.raises(ConfigError, match="given twice"):
        parse_config(["--lora_model_path", str(a), "--lora_model_path", str(b)],
                     sections=("generation", "model"))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["scales", "bases", "missing"])
def test_bad_mix_is_a_clear_error_and_writes_nothing(case, tiny_model_dir, two_adapters, tmp_path):
    from lora import evaluate, inference_lora

    a, b = two_adapters
    paths, scales, expect = [a, b], ["0.7", "0.4", "0.2"], "lora_scale has 3 value(s)"
    if case == "bases":
        other = tmp_path / "other"
        shutil.copytree(b, other)
        cfg = json.loads((other / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = "facebook/musicgen-medium"
        (other / "adapter_config.json").write_text(json.dumps(cfg))
        paths, scales, expect = [a, other], ["1", "1"], "cannot be mixed"
    elif case == "missing":
        paths, scales, expect = [a, tmp_path / "nope"], ["1", "1"], "nope"
    args = ["--model_path", str(tiny_model_dir), "--lora_model_path", *map(str, paths),
            "--lora_scale", *scales]
    with pytest.raises(UserError) as e:
        inference_lora.main(args
                            + ["--prompts", PROMPT, "--duration", "0.5", "--output_dir",
                               str(tmp_path / "o")])
    assert expect in str(e.value)
    with pytest.raises(UserError) as e:
        evaluate.main(args + ["--data_dir", str(tmp_path / "no_data"), "--skip_generation",
                              "--output_dir", str(tmp_path / "ev")])
    assert expect in str(e.value)
    assert not (tmp_path / "o").exists() and not (tmp_path / "ev").exists()


def _style_data(root: Path) -> tuple[Path, dict]:
    """The synthetic example set, with one metadata file per style: {style: metadata file name}."""
    from lora import prepare_data

    data = root / "data"
    assert prepare_data.main(["--create_example", "--output_dir", str(data), "--example_clips", "24",
                              "--example_seconds", "2"]) == 0
    meta = json.loads((data / "metadata.json").read_text())
    files = {}
    for style in ("techno_drums", "ambient_pad"):
        clips = [c for c in meta["clips"] if f"_{style}_" in c["id"]]
        assert {c["split"] for c in clips} == {"train", "valid"}
        (data / f"{style}.json").write_text(json.dumps(dict(meta, clips=clips)))
        files[style] = f"{style}.json"
    return data, files


@pytest.mark.slow
def test_style_adapters_move_the_likelihood_of_their_own_style(tiny_model_dir, tmp_path):
    """Two adapters, each trained briefly on one style, then mixed: at (1, 0) the first style's
    held-out clips are likelier than at (0, 1), and the second style's the other way round."""
    from lora import train_lora
    from lora.dataprep.token_cache import build_token_cache
    from lora.dataset import load_metadata
    from lora.modeling import adapter
    from lora.modeling.loading import load_base_model
    from lora.scoring import likelihood

    data, files = _style_data(tmp_path)
    adapters = {}
    for style, meta in files.items():
        out = tmp_path / style
        assert train_lora.main(["--model_path", str(tiny_model_dir), "--data_dir", str(data),
                                "--metadata_file",
                                meta, "--output_dir", str(out), "--max_steps", "12", "--eval_steps", "12",
                                "--save_steps", "12", "--batch_size", "3",
                                "--gradient_accumulation_steps", "1",
                                "--learning_rate", "0.01", "--warmup_steps", "0",
                                "--mixed_precision", "no", "--max_duration", "2"]) == 0
        adapters[style] = out / "final_model"
    cfg = _cfg(tiny_model_dir)
    model, processor, info = load_base_model(cfg.model)
    clips = {}
    for style, meta in files.items():
        valid = [r for r in load_metadata(str(data), meta) if r.split == "valid"]
        clips[style], _ = build_token_cache(valid, model, processor, info, str(data), batch_size=4)
    mixed, ids = adapter.load_adapters(model, [adapters["techno_drums"], adapters["ambient_pad"]],
                                       [1.0, 0.0])
    names = [x["adapter_name"] for x in ids]
    ce = {}
    for scales in ((1.0, 0.0), (0.0, 1.0)):
        adapter.set_adapter_scales(mixed, dict(zip(names, scales)))
        for style in files:
            ce[scales, style] = likelihood.heldout_likelihood(mixed, clips[style], info,
                                                              info.frames(2.0), 4,
                                                            torch.device("cpu"))["ce"]
    assert ce[(1.0, 0.0), "techno_drums"] < ce[(0.0, 1.0), "techno_drums"]
    assert ce[(0.0, 1.0), "ambient_pad"] < ce[(1.0, 0.0), "ambient_pad"]


# --------------------------------------------------------------------------------------------
# Adapters made elsewhere
# --------------------------------------------------------------------------------------------
OTHER_TRAINERS = {
    "ffn_proj_heads_embed": dict(r=4, lora_alpha=8,
                                 target_modules=r".*decoder\.model\.decoder\.layers\.\d+\.(?:fc1|"
                                 r"fc2)|enc_to_dec_proj|.*lm_heads\.\d+",
                                 modules_to_save=["embed_tokens.0"]),
    "embedding_lora_rank_2": dict(r=2, lora_alpha=2,
                                  target_modules=["embed_tokens.1", "embed_tokens.2", "q_proj"]),
}
SPELLINGS = ["trailing_slash", "same_name_hub_id", "not_recorded"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(OTHER_TRAINERS))
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_adapter_from_another_trainer_loads_generates_merges_and_exports(kind, spelling, tiny_model_dir,
                                                                        two_adapters, tmp_path):
    from safetensors.torch import load_file

    from lora import export_model

    recorded = {"trailing_slash": str(tiny_model_dir) + "/",
                "same_name_hub_id": f"someone/{tiny_model_dir.name}",
                "not_recorded": None}[spelling]
    other = _peft_adapter(tiny_model_dir, tmp_path / "other", seed=5, recorded=recorded,
                          **OTHER_TRAINERS[kind])
    base, _ = _codes(tiny_model_dir, None)
    unmerged, _ = _codes(tiny_model_dir, [other], merge=False, greedy=True)
    merged, info = _codes(tiny_model_dir, [other], greedy=True)
    assert info["merged"] and torch.equal(merged, unmerged)
    assert not torch.equal(_codes(tiny_model_dir, [other])[0], base)
    mix_u, _ = _codes(tiny_model_dir, [two_adapters[0], other], [0.5, 1.0], merge=False, greedy=True)
    mix_m, _ = _codes(tiny_model_dir, [two_adapters[0], other], [0.5, 1.0], merge=True, greedy=True)
    assert torch.equal(mix_u, mix_m)
    out = tmp_path / "merged"
    assert export_model.main(["--base_model_path", str(tiny_model_dir), "--lora_model_path",
                              str(two_adapters[0]),
                              str(other), "--lora_scale", "0.5", "1", "--output_dir", str(out)]) == 0
    exported, _ = _codes(out, None, greedy=True)
    assert torch.equal(exported, mix_m)  # export takes the mix
    weights = load_file(str(out / "model.safetensors"))
    original = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert not any("lora" in k or "modules_to_save" in k for k in weights)
    assert set(weights) == set(original)


def _stereo_adapter(tiny_stereo_model_dir, out, **config):
    return _peft_adapter(tiny_stereo_model_dir, out, seed=0, **config)


@pytest.mark.slow
def test_adapters_that_cannot_fit_name_the_file_and_the_problem(tiny_model_dir,
                                                                tiny_stereo_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora import inference_lora

    run = ["--model_path", str(tiny_model_dir), "--prompts", PROMPT, "--duration", "0.5",
           "--output_dir", str(tmp_path / "o")]
    # Another codebook count: heads of the 8-codebook stereo model, base not recorded.
    heads = _stereo_adapter(tiny_stereo_model_dir, tmp_path / "heads", recorded=None, r=2,
                            target_modules=r".*lm_heads\.\d+")
    with pytest.raises(UserError) as e:
        inference_lora.main(run + ["--lora_model_path", str(heads)])
    msg = str(e.value)
    assert str(heads / "adapter_model.safetensors") in msg and "decoder.lm_heads.4 does not exist" in msg
    assert "num_codebooks 4" in msg
    # Another architecture with the same layer sizes: attention only, recorded base on disk (the
    # stereo model).
    attn = _stereo_adapter(tiny_stereo_model_dir, tmp_path / "attn", r=2,
                           target_modules=["q_proj", "v_proj"])
    with pytest.raises(UserError) as e:
        inference_lora.main(run + ["--lora_model_path", str(attn)])
    assert str(attn) in str(e.value) and "num_codebooks 8 vs 4" in str(e.value)
    # Another model family altogether (a GPT-2 adapter).
    gpt = get_peft_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)),
                         LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    gpt.save_pretrained(str(tmp_path / "gpt"))
    with pytest.raises(UserError) as e:
        inference_lora.main(run + ["--lora_model_path", str(tmp_path / "gpt")])
    # (adapter_config.json's target_modules are checked first: the file and the problem are named)
    assert str(tmp_path / "gpt" / "adapter_config.json") in str(e.value)
    assert "c_attn" in str(e.value) and "match no layer of this model" in str(e.value)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# The start-up line: which model, which adapter, and how to get the other
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_startup_line_names_the_model_and_the_adapter(tiny_model_dir, two_adapters, tmp_path,
                                                      monkeypatch, caplog):
    from lora import config, evaluate, inference_lora

    repo = tmp_path / "repo"
    monkeypatch.setattr(config, "REPO_ROOT", repo)
    monkeypatch.setattr(config, "DEFAULT_CONFIG", repo / "config.yaml")  # none there
    common = ["--model_path", str(tiny_model_dir), "--prompts", PROMPT, "--duration", "0.5",
              "--overwrite"]

    def line(args, script=inference_lora):
        caplog.clear()
        with caplog.at_level("INFO", logger="lora"):
            if script is inference_lora:
                assert inference_lora.main(common + args) == 0
            else:
                # no data: it stops after saying which model it would evaluate
                with pytest.raises(UserError):
                    evaluate.main(["--model_path", str(tiny_model_dir), "--data_dir",
                                   str(tmp_path / "none"), "--skip_generation", *args])
        return next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Model: "))

    assert line([]) == (f"Model: {tiny_model_dir}, no adapter: base model alone (nothing at the default "
                        f"lora_model_path {repo / 'output' / 'best_model'}). To apply a trained "
                        f"adapter, pass --lora_model_path FOLDER (train_lora.py writes "
                        f"output/best_model).")
    shutil.copytree(two_adapters[0], repo / "output" / "best_model")
    default = repo / "output" / "best_model"
    for script in (inference_lora, evaluate):
        assert line([],
                    script) == (f"Model: base model {tiny_model_dir} + adapter {default} (scale 1) "
                                f"(the default "
                                    f"lora_model_path, found on disk). For the base model alone, pass "
                                    f"--lora_model_path none.")
        assert line(["--lora_model_path", "none"], script).startswith(
            f"Model: {tiny_model_dir}, no adapter: base model alone (lora_model_path: none).")
    entry = json.loads((repo / "output" / "generated" / "manifest.json").read_text())["files"][0]
    assert entry["adapter"] is None  # the last inference run: --lora_model_path none


@pytest.mark.slow
def test_evaluate_a_mix_records_each_adapter_and_one_zero_is_a_alone(tiny_model_dir, two_adapters,
                                                                     example_data_dir,
                                                                       tmp_path):
    from lora import evaluate

    a, b = two_adapters
    common = ["--model_path", str(tiny_model_dir), "--data_dir", str(example_data_dir),
              "--skip_generation", "--compare", "--bootstrap_samples", "100"]
    assert evaluate.main(common
                         + ["--lora_model_path", str(a), "--output_dir", str(tmp_path / "alone")]) == 0
    assert evaluate.main(common + ["--lora_model_path", str(a), str(b), "--lora_scale", "1", "0",
                                   "--output_dir", str(tmp_path / "mix")]) == 0
    alone = json.loads((tmp_path / "alone" / "results.json").read_text())
    mix = json.loads((tmp_path / "mix" / "results.json").read_text())
    assert mix["likelihood"]["lora"]["ce"] == alone["likelihood"]["lora"]["ce"]
    assert mix["likelihood"]["base"]["ce"] == alone["likelihood"]["base"]["ce"] != alone["likelihood"]["lora"]["ce"]
    assert [(x["path"], x["scale"])
            for x in mix["identity"]["lora"]["adapters"]] == [(str(a.resolve()), 1.0),
                                                                                      (str(b.resolve()), 0.0)]


# ------------------------------------------------------------------------------------------------
# One adapter: the layers it adapts, saved as a standard PEFT adapter, loaded with its checks;
# a scale of 0 is the base model
# ------------------------------------------------------------------------------------------------
def _expected(layers, parts):
    return {f"decoder.model.decoder.layers.{i}.{p}" for i in range(layers) for p in parts}


ATTN = [f"{a}.{p}" for a in ("self_attn", "encoder_attn")
        for p in ("q_proj", "k_proj", "v_proj", "out_proj")]


def _lora_names(peft_model):
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
            if hasattr(m, "lora_A")}


def test_lora_default_targets_are_decoder_attention(tiny_model_dir):
    model, _, _ = load_model(tiny_model_dir)
    layers = model.config.decoder.num_hidden_layers
    pm = attach_lora(model, LoraSection())
    assert _lora_names(pm) == _expected(layers, ATTN)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_attention_ffn_and_text_encoder(tiny_model_dir):
    model, _, _ = load_model(tiny_model_dir)
    layers = model.config.decoder.num_hidden_layers
    pm = attach_lora(model,
                     LoraSection(lora_targets="attention_ffn", train_text_encoder=True, use_rslora=True))
    names = _lora_names(pm)
    assert _expected(layers, ATTN + ["fc1", "fc2"]) <= names
    text = {n for n in names if n.startswith("text_encoder.")}
    assert len(text) == 4 * model.config.text_encoder.num_layers
    assert not any(n.startswith("audio_encoder.") for n in names)
    assert names - text == _expected(layers, ATTN + ["fc1", "fc2"])


def test_lora_custom_targets_and_bad_pattern(tiny_model_dir):
    model, _, _ = load_model(tiny_model_dir)
    pm = attach_lora(model, LoraSection(lora_targets="q_proj, v_proj"))
    layers = model.config.decoder.num_hidden_layers
    assert _lora_names(pm) == _expected(layers, [f"{a}.{p}" for a in ("self_attn", "encoder_attn")
                                                 for p in ("q_proj", "v_proj")])
    model, _, _ = load_model(tiny_model_dir)
    with pytest.raises(UserError) as e:
        attach_lora(model, LoraSection(lora_targets="attn_qkv_does_not_exist"))
    assert "attn_qkv_does_not_exist" in str(e.value) and "self_attn.q_proj" in str(e.value)


def test_saved_adapter_loads_with_plain_peft(tmp_path, tiny_model_dir, mono):
    from peft import PeftModel
    from transformers import MusicgenForConditionalGeneration

    _, processor, info = mono
    model, _, _ = load_model(tiny_model_dir)
    pm = attach_lora(model, LoraSection(lora_rank=4, lora_alpha=8))
    torch.manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)  # a trained-looking adapter (B starts at zero)
    pm.eval()
    codes = torch.randint(0, info.vocab_size, (1, info.num_codebooks, 7))
    dii, labels = build_delay_pattern(codes, torch.tensor([7]), info)
    hidden, mask = encode_text(pm, processor, ["techno kick loop"])
    with torch.no_grad():
        trained = pm(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=dii).logits
    pm.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    base = MusicgenForConditionalGeneration.from_pretrained(cfg["base_model_name_or_path"]).eval()
    with torch.no_grad():
        plain = base(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=dii).logits
    assert not torch.allclose(plain, trained, atol=1e-4)  # the adapter changes the model
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        again = reloaded(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=dii).logits
    torch.testing.assert_close(again, trained)

    ours = load_lora(load_model(tiny_model_dir)[0], tmp_path / "adapter")
    with torch.no_grad():
        ours_logits = ours(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=dii).logits
    torch.testing.assert_close(ours_logits, trained)


@pytest.mark.slow
def test_load_lora_errors(tmp_path, tiny_model_dir, tiny_stereo_model_dir):
    model, _, _ = load_model(tiny_model_dir)
    pm = attach_lora(model, LoraSection(lora_rank=2))
    pm.save_pretrained(tmp_path / "adapter")

    with pytest.raises(UserError, match="not found"):
        load_lora(load_model(tiny_model_dir)[0], tmp_path / "nothing_here")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tmp_path / "adapter" / "adapter_config.json", partial)
    with pytest.raises(UserError) as e:
        load_lora(load_model(tiny_model_dir)[0], partial)
    assert "adapter_model.safetensors" in str(e.value) and "adapter_config.json," not in str(e.value)

    # another architecture (stereo decoder): both bases are named
    with pytest.raises(UserError) as e:
        load_lora(load_model(tiny_stereo_model_dir)[0], tmp_path / "adapter")
    assert str(tiny_model_dir.resolve()) in str(e.value) and str(tiny_stereo_model_dir.resolve()) in str(e.value)

    # same architecture, but another model folder: it loads, with a warning naming both (issue 28:
    # the plan's local copy of a model whose hub id an adapter records)
    other = tmp_path / "some-other-model"
    shutil.copytree(tiny_model_dir, other)
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("lora").addHandler(handler)
    try:
        load_lora(load_model(other)[0], tmp_path / "adapter")
    finally:
        logging.getLogger("lora").removeHandler(handler)
    said = " ".join(r.getMessage() for r in records if r.levelno >= logging.WARNING)
    assert str(tiny_model_dir.resolve()) in said and str(other.resolve()) in said


@pytest.mark.slow
def test_lora_scale_zero_is_exactly_the_base_model_for_dora(tmp_path, tiny_model_dir, example_data_dir):
    """peft's set_scale(0) zeroes B·A but DoRA's magnitude vector still rescales every adapted
    weight: set_lora_scale(0) switches the adapter off instead, so scale 0 is the base model exactly
    (held-out logits and generated audio, merged or not, and after evaluate's disable_adapter()
    context), and scale 1 is not."""
    import torch
    from peft.tuners.lora import LoraLayer

    from lora.config import LoraSection, ModelConfig, parse_config
    from lora.dataprep.token_cache import build_token_cache
    from lora.dataset import load_metadata
    from lora.generation.model import load_generation_model
    from lora.modeling.adapter import attach_lora, set_lora_scale
    from lora.modeling.loading import load_base_model

    cpu = torch.device("cpu")
    model, proc, info = load_base_model(ModelConfig(model_path=str(tiny_model_dir)))
    clips, _ = build_token_cache(load_metadata(example_data_dir, split="valid"), model, proc, info,
                                 example_data_dir, show_progress=False)

    def per_clip(m):
        return [c["ce"] for c in likelihood.heldout_likelihood(m, clips, info, 200, 2, cpu)["per_clip"]]

    base = per_clip(model)
    torch.manual_seed(0)
    peft = attach_lora(model, LoraSection(use_dora=True))
    # a "trained" DoRA adapter: B non-zero, magnitudes away from the weight norms
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.5)
    peft.eval()
    full = per_clip(peft)
    assert max(abs(a - b) for a, b in zip(full, base)) > 1e-3
    for module in peft.modules():  # peft's own scale 0 (the old set_lora_scale): not the base model
        if isinstance(module, LoraLayer):
            module.set_scale("default", 0.0)
    assert max(abs(a - b) for a, b in zip(per_clip(peft), base)) > 1e-4
    set_lora_scale(peft, 0.0)
    assert per_clip(peft) == base  # exactly
    with peft.disable_adapter():  # evaluate's base context must not bring the adapter back on exit
        pass
    assert per_clip(peft) == base
    set_lora_scale(peft, 1.0)
    assert per_clip(peft) == pytest.approx(full, abs=1e-6)

    # generation: the saved adapter at lora_scale 0, unmerged and merged, makes the base model's
    # audio
    peft.save_pretrained(tmp_path / "dora")
    argv = ["--base_model_path", str(tiny_model_dir), "--dtype", "float32", "--do_sample", "false",
            "--eval_duration", "0.3"]
    sections = ("evaluation", "model", "generation", "data")
    cfg, _ = parse_config(argv, sections=sections)
    ref_model, ref_proc, _, _ = load_generation_model(cfg, device="cpu", adapter_path=None)
    want = generated.generate_clips(ref_model, ref_proc, info, "base", ["lofi piano"], [0], cfg)[0]
    for scale, merge in (("0", "false"), ("0", "true"), ("1", "false")):
        cfg, _ = parse_config(argv + ["--lora_model_path", str(tmp_path / "dora"), "--lora_scale", scale,
                                      "--merge", merge], sections=sections)
        m, p, _, adapter_info = load_generation_model(cfg, device="cpu")
        assert adapter_info["scale"] == float(scale) and adapter_info["merged"] == (merge == "true")
        got = generated.generate_clips(m, p, info, "lora", ["lofi piano"], [0], cfg)[0]
        if scale == "0":
            assert np.array_equal(got, want), (scale, merge)
        else:
            assert not np.allclose(got, want, atol=1e-4)
