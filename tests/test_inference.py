"""Generation (lora/generation/engine.py) and the inference script (lora/inference_lora.py) on the
tiny models, CPU.

Token-level comparisons use the codes each sample was decoded from (Result.codes, manifest
tokens_sha1), so they hold whatever the tiny codec sounds like; audio comparisons check the files
users get.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from lora.common.cli import UserError
from lora.common.fields import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SEED_PROMPT = "hip hop 808 beat with trap drums"
SEED_SLUG = "hip-hop-808-beat-with-trap-drums"


def _cfg(model_dir, **gen):
    from lora.config import Config

    # fp32 unless a test asks otherwise: these tests compare tokens exactly (with transformers'
    # generate, merged vs unmerged, scale 0 vs base); dtype auto is bf16 on CPUs with
    # AMX/AVX512-BF16 (the CLI tests run it)
    gen.setdefault("dtype", "float32")
    cfg = Config()
    cfg.model.model_path = str(model_dir)
    for k, v in gen.items():
        setattr(cfg.generation, k, v)
    return cfg


def _make_adapter(model_dir, out_dir, *, fill=None, seed=0) -> Path:
    """A LoRA adapter on the tiny model whose B matrices are random (so it changes the output)."""
    from lora.modeling import adapter, loading

    cfg = _cfg(model_dir)
    model, _, _ = loading.load_base_model(cfg.model)
    peft_model = adapter.attach_lora(model, cfg.lora)
    g = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.5
            if fill is not None:
                p.data.fill_(fill)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return _make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "best_model")


@pytest.fixture(scope="module")
def base_bundle(tiny_model_dir):
    from lora.generation.model import load_generation_model

    return load_generation_model(_cfg(tiny_model_dir), adapter_path=None)


def _gen(bundle, requests, **kw):
    from lora.generation.engine import generate

    model, processor, info, _ = bundle
    kw.setdefault("progress", False)
    return generate(model, processor, info, requests, **kw)


def _req(prompt, seed, duration=1.0, **sampling):
    from lora.generation.requests import Request, SamplingSettings

    return Request(prompt=prompt, seed=seed, duration=duration, sampling=SamplingSettings(**sampling))


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stereo", [False, True], ids=["mono", "stereo"])
def test_greedy_guided_decoding_equals_transformers_generate(stereo, tiny_model_dir,
                                                             tiny_stereo_model_dir, monkeypatch):
    """Our loop (batched CFG, delay pattern, cache) against transformers' own MusicGen
    generate()."""
    from lora.generation.model import load_generation_model

    model_dir = tiny_stereo_model_dir if stereo else tiny_model_dir
    bundle = load_generation_model(_cfg(model_dir), adapter_path=None)
    model, processor, info, _ = bundle
    prompts = [SEED_PROMPT, "lofi piano"]
    ours = _gen(bundle, [_req(p, 0, 1.0, guidance_scale=3.0, do_sample=False) for p in prompts])

    seen = []
    decode = model.audio_encoder.decode

    def spy(audio_codes, *a, **k):
        seen.append(audio_codes.clone())
        return decode(audio_codes, *a, **k)

    monkeypatch.setattr(model.audio_encoder, "decode", spy)
    inputs = processor(text=prompts, padding=True, return_tensors="pt")
    frames = info.frames(1.0)
    with torch.no_grad():
        ref_audio = model.generate(**inputs, do_sample=False, guidance_scale=3.0,
                                   max_new_tokens=frames + info.codebooks_per_channel - 1)
    ref_codes = seen[0][0]  # (B, K, T)
    if stereo:  # generate() decodes left (even codebooks) and right (odd) separately
        left, right = seen[0][0], seen[1][0]
        ref_codes = torch.stack([left, right], dim=2).reshape(len(prompts), info.num_codebooks, -1)
    for i, r in enumerate(ours):
        assert r.codes.shape == (info.num_codebooks, frames)
        assert torch.equal(r.codes, ref_codes[i])
        assert r.audio.shape == (info.audio_channels, 32000)
        np.testing.assert_allclose(r.audio, ref_audio[i].numpy(), atol=1e-5)
    assert not torch.equal(ours[0].codes, ours[1].codes)  # the text conditions the result
    assert np.abs(ours[0].audio - ours[1].audio).max() > 1e-5


def test_seed_reproduces_a_sample_alone_or_in_any_batch(base_bundle):
    prompts = ["lofi piano", SEED_PROMPT, "dark techno with heavy kick"]
    batch = _gen(base_bundle, [_req(p, 10 + i, top_k=50) for i, p in enumerate(prompts)], batch_size=3)
    alone = _gen(base_bundle, [_req(SEED_PROMPT, 11, top_k=50)])[0]
    again = _gen(base_bundle, [_req(SEED_PROMPT, 11, top_k=50)])[0]
    other_seed = _gen(base_bundle, [_req(SEED_PROMPT, 12, top_k=50)])[0]
    assert batch[1].batch_size == 3 and alone.batch_size == 1
    assert torch.equal(alone.codes, again.codes) and np.array_equal(alone.audio, again.audio)
    assert torch.equal(batch[1].codes, alone.codes)
    np.testing.assert_allclose(batch[1].audio, alone.audio, atol=1e-5)
    assert not torch.equal(other_seed.codes, alone.codes)
    # another seed is other music (float noise ~1e-7)
    assert np.abs(other_seed.audio - alone.audio).max() > 1e-5
    assert alone.audio.shape == (1, 32000) and alone.audio.dtype == np.float32


def test_token_sampler_follows_top_k_top_p_and_the_distribution():
    from lora.generation.engine import TokenSampler
    from lora.generation.requests import SamplingSettings

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(40000, 1)
    u = torch.rand(40000, generator=torch.Generator().manual_seed(0))
    full = TokenSampler(SamplingSettings(top_k=0), 4)(logits, u)
    freq = torch.bincount(full, minlength=4).float() / len(full)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.01)
    top2 = TokenSampler(SamplingSettings(top_k=2), 4)(logits, u)
    assert set(top2.tolist()) == {0, 1}
    assert abs((top2 == 0).float().mean().item() - 0.5 / 0.8) < 0.01
    # top_p replaces top_k
    nucleus = TokenSampler(SamplingSettings(top_k=1, top_p=0.7), 4)(logits, u)
    assert set(nucleus.tolist()) == {0, 1}
    greedy = TokenSampler(SamplingSettings(do_sample=False), 4)(logits[:3])
    assert greedy.tolist() == [0, 0, 0]
    cold = TokenSampler(SamplingSettings(top_k=0, temperature=0.05), 4)(logits, u)
    assert (cold == 0).float().mean().item() > 0.99


def test_lora_scale_and_merge(tiny_model_dir, adapter_dir, base_bundle):
    from lora.generation.model import load_generation_model

    def codes(scale, merge):
        bundle = load_generation_model(_cfg(tiny_model_dir, lora_scale=scale, merge=merge),
                                       adapter_path=adapter_dir)
        adapter = bundle[3]
        assert adapter["scale"] == scale and adapter["merged"] == (merge if merge is not None
                                                                   else scale == 1.0)
        return _gen(bundle, [_req(SEED_PROMPT, 5)])[0]

    base = _gen(base_bundle, [_req(SEED_PROMPT, 5)])[0]
    merged = codes(1.0, None)  # default: merged at scale 1
    unmerged = codes(1.0, False)
    zero = codes(0.0, None)
    half = codes(0.5, None)
    assert torch.equal(merged.codes, unmerged.codes)
    np.testing.assert_allclose(merged.audio, unmerged.audio, atol=1e-5)
    assert torch.equal(zero.codes, base.codes)
    assert not torch.equal(merged.codes, base.codes)  # the adapter matters
    assert not torch.equal(half.codes, base.codes) and not torch.equal(half.codes, merged.codes)
    assert np.abs(merged.audio - base.audio).max() > 1e-5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_static_cache_decoder_equals_transformers_forward(attn, tiny_model_dir, adapter_dir):
    """lora.modeling.fast_decode.StaticDecoder (preallocated cache; what CUDA graphs replay) gives
    transformers' logits: prefill of a prefix, then step by step, with guidance's null half, on an
    unmerged LoRA model."""
    from lora.generation.engine import _text_states
    from lora.modeling import adapter, loading, musicgen
    from lora.modeling.fast_decode import StaticDecoder

    cfg = _cfg(tiny_model_dir)
    cfg.model.attn_implementation = attn
    model, processor, info = loading.load_base_model(cfg.model)
    model = adapter.load_lora(model, adapter_dir)
    model.eval()
    base = musicgen.get_base(model)
    hidden, mask = _text_states(model, processor, [SEED_PROMPT, "lofi piano"], 3.0,
                                torch.float32)
    rows, K = hidden.shape[0], info.num_codebooks
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, info.vocab_size, (rows * K, 12), generator=g)
    with torch.no_grad():
        # (rows*K, 12, V)
        ref = base(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=ids).logits
        dec = StaticDecoder(base, hidden, mask, rows=rows, max_len=12)
        got = [dec.prefill(ids[:, :5])] + [dec.step(ids[:, t], t) for t in range(5, 12)]
    for t, logits in zip(range(4, 12), got):
        torch.testing.assert_close(logits, ref[:, t], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(base, hidden, mask, rows=rows, max_len=12, cuda_graph=True)


def test_static_decoding_generates_the_same_music(base_bundle):
    """decoding: static is a speed choice only: same tokens as transformers' cache, windows and
    prompts too."""
    reqs = [_req(SEED_PROMPT, 7, 2.0, top_k=50), _req("lofi piano", 8, 2.0, top_k=50)]
    kw = dict(batch_size=2, max_window=1.2, extend_stride=0.8)
    ref = _gen(base_bundle, reqs, decoding="transformers", **kw)
    got = _gen(base_bundle, reqs, decoding="static", **kw)
    assert len(ref[0].windows) == 2
    for a, b in zip(ref, got):
        assert torch.equal(a.codes, b.codes)
        np.testing.assert_allclose(a.audio, b.audio, atol=1e-6)
    with pytest.raises(UserError, match="CUDA"):
        _gen(base_bundle, reqs, decoding="cuda_graph")


def test_generation_dtype_auto_follows_the_hardware(monkeypatch):
    """dtype auto: bf16 on a CPU with AMX-BF16 / AVX512-BF16 (read from /proc/cpuinfo), fp32 on one
    without; a named dtype is used as is."""
    from lora.modeling import precision
    from lora.modeling.precision import generation_dtype as resolve_dtype

    monkeypatch.setattr(precision, "cpu_flags",
                        lambda cpuinfo="/proc/cpuinfo": frozenset({"avx512f", "amx_bf16"}))
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": frozenset({"avx2"}))
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16 and resolve_dtype("float32",
                                                                                "cpu") == torch.float32


def test_plan_windows_matches_audiocraft_loop():
    from lora.generation.requests import plan_windows

    # audiocraft.models.genmodel._generate_tokens, no audio prompt
    def audiocraft(total, window, stride):
        out, offset, prompt_len = [], 0, 0
        while offset + prompt_len < total:
            gen_len = min(total - offset, window)
            out.append((offset, prompt_len, gen_len - prompt_len))
            prompt_len = gen_len - stride
            offset += stride
        return out

    for total, window, stride in [(3000, 1500, 900), (6000, 1500, 900), (1600, 1500, 900),
                                  (1500, 1500, 900), (150, 50, 30), (700, 100, 99)]:
        ours = [(w.start, w.context, w.new) for w in plan_windows(total, 0, window, stride)]
        assert ours == audiocraft(total, window, stride), (total, window, stride)
        assert ours[-1][0] + ours[-1][1] + ours[-1][2] == total
    # An audio prompt that fits is the whole context of a single window.
    assert [(w.start, w.context, w.new) for w in plan_windows(1000, 400, 1500, 900)] == [(0, 400, 600)]


def test_windowed_continuation_is_seamless(base_bundle):
    info = base_bundle[2]
    r = _gen(base_bundle, [_req("lofi piano", 3, 3.0)], max_window=1.0, extend_stride=0.6)[0]
    assert r.codes.shape == (info.num_codebooks, 150) and r.audio.shape == (1, 3 * 32000)
    assert [(w.start, w.context, w.new) for w in r.windows] == [(0, 0, 50), (30, 20, 30), (60, 20, 30),
                                                               (90, 20, 30), (120, 20, 10)]
    for w, prompt, head in zip(r.windows, r.window_prompts, r.window_heads):
        # the window was prompted with the last tokens of the stream so far, and kept them unchanged
        assert torch.equal(prompt, r.codes[:, w.start: w.start + w.context])
        assert torch.equal(head, prompt)
    assert len({tuple(r.codes[:, i * 30:(i + 1) * 30].flatten().tolist()) for i in range(5)}) == 5


def test_audio_prompt_is_continued(base_bundle):
    from lora.generation.engine import encode_audio_prompt

    model, _, info, _ = base_bundle
    t = np.arange(16000) / 32000
    wav = (0.3 * np.sin(2 * np.pi * 220 * t))[None].astype(np.float32)
    codes, pid = encode_audio_prompt(model, info, wav)
    from lora.generation.requests import Request

    r = _gen(base_bundle, [Request("lofi piano", 1, 1.0, prompt_codes=codes, prompt_id=pid)])[0]
    assert codes.shape == (info.num_codebooks, 25)
    assert torch.equal(r.codes[:, :25], codes) and r.codes.shape[-1] == 50


# --------------------------------------------------------------------------------------------
# The script
# --------------------------------------------------------------------------------------------
def _run(args):
    from lora import inference_lora

    return inference_lora.main([str(a) for a in args])


def _manifest(out_dir) -> dict:
    return json.loads((Path(out_dir) / "manifest.json").read_text(encoding="utf-8"))


def test_seed_command_from_inside_lora_writes_wav_and_manifest(tiny_model_dir, adapter_dir,
                                                               tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    (proj / "lora").mkdir(parents=True)
    shutil.copytree(adapter_dir, proj / "output" / "best_model")
    monkeypatch.chdir(proj / "lora")
    rc = _run(["--base_model_path", tiny_model_dir, "--lora_model_path", "../output/best_model",
               "--prompts", SEED_PROMPT, "--output_dir", "../output/generated", "--duration", "1.5"])
    assert rc == 0
    out = proj / "output" / "generated"
    wav = out / f"{SEED_SLUG}_s0.wav"
    data, sr = sf.read(wav, dtype="float32", always_2d=True)
    assert sr == 32000 and data.shape == (48000, 1) and sf.info(wav).subtype == "PCM_16"
    # peak-normalised to -1 dBFS, no clipping
    assert abs(np.abs(data).max() - 10 ** (-1 / 20)) < 1e-3
    entry = _manifest(out)["files"][0]
    assert entry["file"] == wav.name and entry["prompt"] == SEED_PROMPT and entry["seed"] == 0
    s = entry["settings"]
    assert (s["duration"], s["guidance_scale"], s["top_k"], s["temperature"], s["lora_scale"],
            s["merge"]) == \
        (1.5, 3.0, 250, 1.0, 1.0, True)
    assert entry["model"]["name_or_path"] == str(tiny_model_dir) and len(entry["model"]["identity"]) == 16
    weights = (proj / "output" / "best_model" / "adapter_model.safetensors").read_bytes()
    assert entry["adapter"]["path"] == str(proj / "output" / "best_model")
    assert entry["adapter"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert entry["duration_s"] == 1.5 and entry["channels"] == 1 and entry["generation_time_s"] > 0
    assert entry["real_time_factor"] == pytest.approx(entry["generation_time_s"] / 1.5, rel=1e-2)
    assert (out / "inference_config.yaml").is_file()


def test_seed_command_as_a_subprocess_from_lora(tiny_model_dir, adapter_dir, tmp_path):
    out = tmp_path / "gen"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "inference_lora.py", "--base_model_path", str(tiny_model_dir),
           "--lora_model_path",
           os.path.relpath(adapter_dir, ROOT / "lora"), "--prompts", SEED_PROMPT, "--output_dir",
           str(out), "--duration", "0.5"]
    p = subprocess.run(cmd, cwd=ROOT / "lora", env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "real-time factor" in p.stdout
    assert sf.info(out / f"{SEED_SLUG}_s0.wav").frames == 16000


def test_merge_flag_gives_the_same_audio_as_unmerged(tiny_model_dir, adapter_dir, tmp_path):
    common = ["--model_path", tiny_model_dir, "--lora_model_path", adapter_dir, "--prompts", "lofi piano",
              "--duration", "1", "--seed", "7", "--output_format", "float", "--normalize", "false",
              # merging is exact in fp32 (in bf16 W + BA is rounded once more)
              "--dtype", "float32"]
    assert _run(common + ["--merge", "--output_dir", tmp_path / "m"]) == 0
    assert _run(common + ["--merge", "false", "--output_dir", tmp_path / "u"]) == 0
    a, _ = sf.read(tmp_path / "m" / "lofi-piano_s7.wav", dtype="float32")
    b, _ = sf.read(tmp_path / "u" / "lofi-piano_s7.wav", dtype="float32")
    assert sf.info(tmp_path / "m" / "lofi-piano_s7.wav").subtype == "FLOAT"
    np.testing.assert_allclose(a, b, atol=1e-5)
    em, eu = _manifest(tmp_path / "m")["files"][0], _manifest(tmp_path / "u")["files"][0]
    assert em["settings"]["merge"] is True and eu["settings"]["merge"] is False
    assert em["tokens_sha1"] == eu["tokens_sha1"]


def test_duration_60_writes_a_60_second_file(tiny_model_dir, tmp_path):
    assert _run(["--model_path", tiny_model_dir, "--lora_model_path", "none", "--prompts",
                 "long ambient pad", "--duration", "60", "--output_dir", tmp_path]) == 0
    info = sf.info(tmp_path / "long-ambient-pad_s0.wav")
    assert info.samplerate == 32000 and info.frames == 60 * 32000
    entry = _manifest(tmp_path)["files"][0]
    assert entry["windows"] == 3 and entry["frames"] == 3000 and entry["adapter"] is None


def test_many_prompts_samples_prompts_file_and_stereo(tiny_stereo_model_dir, tmp_path):
    pf = tmp_path / "prompts.jsonl"
    pf.write_text('{"text": "bright synth arpeggio", "duration": 0.5, "seed": 40, "num_samples": 2}\n'
                  '"lofi 中文 piano / é?!"\n', encoding="utf-8")
    out = tmp_path / "out"
    assert _run(["--model_path", tiny_stereo_model_dir, "--lora_model_path", "none", "--prompts",
                 "dark techno",
                 "--prompts_file", pf, "--duration", "0.7", "--num_samples", "1", "--batch_size", "2",
                 "--output_dir", out]) == 0
    files = {e["file"]: e for e in _manifest(out)["files"]}
    assert set(files) == {"dark-techno_s0.wav", "bright-synth-arpeggio_s40.wav",
                          "bright-synth-arpeggio_s41.wav", "lofi-中文-piano-é_s0.wav"}
    for name, e in files.items():
        info = sf.info(out / name)
        assert info.channels == 2 and e["channels"] == 2
        assert info.frames == round(e["settings"]["duration"] * 32000)
    a, b = files["bright-synth-arpeggio_s40.wav"], files["bright-synth-arpeggio_s41.wav"]
    assert a["tokens_sha1"] != b["tokens_sha1"]


def test_slugs_are_safe_and_short():
    from lora.generation.manifest import output_names, slugify

    assert slugify("Hip Hop 808 beat, with TRAP drums!!") == "hip-hop-808-beat-with-trap-drums"
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("🎵🎶") == ""
    assert len(slugify("日本語の音楽 " * 40).encode("utf-8")) <= 80
    names = output_names([_req("a b", 0), _req("a-b", 0), _req("🎵", 1), _req("", 2)])
    assert names[0] != names[1] and names[0].startswith("a-b-") and names[2].startswith("prompt-")
    assert names[3] == "unconditional_s2.wav"
    assert all("/" not in n for n in names)


def test_unconditional_generation_needs_the_flag(tiny_model_dir, tmp_path):
    base = ["--model_path", tiny_model_dir, "--lora_model_path", "none", "--output_dir", tmp_path,
            "--duration", "0.5"]
    with pytest.raises(ConfigError, match="No prompt given"):
        _run(base)
    with pytest.raises(ConfigError, match="empty"):
        _run(base + ["--prompts", "  "])
    assert _run(base + ["--unconditional"]) == 0
    assert sf.info(tmp_path / "unconditional_s0.wav").frames == 16000
    assert _manifest(tmp_path)["files"][0]["unconditional"] is True


@pytest.mark.parametrize("args, message", [
    (["--duration", "0"], "duration must be > 0"),
    (["--duration", "-3"], "duration must be > 0"),
    (["--duration", "7200"], "at most 3600"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--top_p", "1.5"], "top_p must be in"),
    (["--guidance_scale", "0.5"], "guidance_scale must be >= 1"),
    (["--extend_stride", "30"], "extend_stride"),
    (["--lora_model_path", "does/not/exist"], "adapter folder not found"),
    (["--audio_prompt", "nope.wav"], "audio_prompt file not found"),
])
def test_bad_settings_are_clear_errors_and_write_nothing(args, message, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    adapter = [] if "--lora_model_path" in args else ["--lora_model_path", "none"]
    with pytest.raises((ConfigError, UserError), match=message):
        _run(["--model_path", tiny_model_dir, *adapter, "--prompts", "x", "--output_dir", out] + args)
    assert not out.exists()


def test_prompts_file_errors_name_the_line_and_key(tmp_path, tiny_model_dir):
    pf = tmp_path / "p.jsonl"
    pf.write_text('{"text": "ok"}\n{"txt": "typo"}\n{"text": "x", "duration": "long"}\nnot json\n')
    with pytest.raises(ConfigError) as e:
        _run(["--model_path", tiny_model_dir, "--prompts_file", pf, "--output_dir", tmp_path / "o"])
    msg = str(e.value)
    assert "p.jsonl line 2: unknown key(s) 'txt'" in msg
    assert "p.jsonl line 3: 'duration' must be a number" in msg
    assert "p.jsonl line 4 is not valid JSON" in msg


def test_adapter_problems_are_named(tiny_model_dir, adapter_dir, tmp_path):
    base = ["--model_path", tiny_model_dir, "--prompts", "x", "--duration", "0.5", "--output_dir",
            tmp_path / "o"]
    empty = tmp_path / "empty_adapter"
    empty.mkdir()
    with pytest.raises(UserError, match="missing adapter_config.json, adapter_model.safetensors"):
        _run(base + ["--lora_model_path", empty])
    other = tmp_path / "other_adapter"
    shutil.copytree(adapter_dir, other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    # (a recorded base of another name loads when it fits; one of another family does not)
    cfg["base_model_name_or_path"] = "facebook/musicgen-melody"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as e:
        _run(base + ["--lora_model_path", other])
    assert "facebook/musicgen-melody" in str(e.value) and str(tiny_model_dir) in str(e.value)
    assert not (tmp_path / "o").exists()


def test_missing_default_adapter_falls_back_to_the_base_model(tiny_model_dir, tmp_path, monkeypatch,
                                                              caplog):
    from lora import config

    monkeypatch.setattr(config, "REPO_ROOT", tmp_path / "repo")
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "repo" / "config.yaml")  # none there
    with caplog.at_level("WARNING", logger="lora"):
        assert _run(["--model_path", tiny_model_dir, "--prompts", "x", "--duration", "0.5"]) == 0
    assert "BASE MODEL ONLY" in caplog.text
    entry = _manifest(tmp_path / "repo" / "output" / "generated")["files"][0]
    assert entry["adapter"] is None


def test_nan_output_is_an_error_not_a_file(tiny_model_dir, tmp_path):
    bad = _make_adapter(tiny_model_dir, tmp_path / "nan_adapter", fill=float("nan"))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="NaN"):
        _run(["--model_path", tiny_model_dir, "--lora_model_path", bad, "--prompts", "x",
              "--duration", "0.5", "--output_dir", out])
    assert not out.exists() or not any(out.iterdir())


def test_existing_files_are_not_overwritten_without_flag(tiny_model_dir, tmp_path):
    base = ["--model_path", tiny_model_dir, "--lora_model_path", "none", "--duration", "0.5",
            "--output_dir", tmp_path]
    assert _run(base + ["--prompts", "lofi piano"]) == 0
    first, _ = sf.read(tmp_path / "lofi-piano_s0.wav", dtype="float32")
    with pytest.raises(UserError, match="already exist.*lofi-piano_s0.wav.*--overwrite"):
        _run(base + ["--prompts", "dark techno", "lofi piano"])
    assert not (tmp_path / "dark-techno_s0.wav").exists()  # checked before generating anything
    with pytest.raises(UserError, match="same prompt"):
        _run(base + ["--prompts", "dub", "dub", "--overwrite"])
    assert _run(base + ["--prompts", "dark techno", "lofi piano", "--overwrite", "--seed", "0"]) == 0
    again, _ = sf.read(tmp_path / "lofi-piano_s0.wav", dtype="float32")
    np.testing.assert_allclose(again, first, atol=1.5 / 32768)  # same seed, same music
    assert {e["file"] for e in _manifest(tmp_path)["files"]} == {"lofi-piano_s0.wav",
                                                                 "dark-techno_s0.wav"}


def test_reduced_precision_keeps_codec_and_text_encoder_in_fp32(tiny_model_dir, adapter_dir):
    from lora.generation.model import load_generation_model
    from lora.modeling import musicgen

    bundle = load_generation_model(_cfg(tiny_model_dir, dtype="bfloat16", merge=False),
                                   adapter_path=adapter_dir)
    base = musicgen.get_base(bundle[0])
    assert next(base.decoder.parameters()).dtype == torch.bfloat16
    assert next(base.audio_encoder.parameters()).dtype == torch.float32
    assert next(base.text_encoder.parameters()).dtype == torch.float32
    r = _gen(bundle, [_req("lofi piano", 1, 0.3)])[0]
    assert r.audio.dtype == np.float32 and np.isfinite(r.audio).all() and r.audio.shape == (1, 9600)


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


def test_audio_prompt_continuation_from_the_command_line(tiny_model_dir, tmp_path):
    t = np.arange(16000) / 32000
    sf.write(tmp_path / "intro.wav", (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 32000)
    out = tmp_path / "out"
    args = ["--model_path", tiny_model_dir, "--lora_model_path", "none", "--prompts", "lofi piano",
            "--audio_prompt", tmp_path / "intro.wav", "--output_dir", out]
    with pytest.raises(UserError, match="does not reach past the audio prompt"):
        _run(args + ["--duration", "0.4"])
    assert _run(args + ["--duration", "1.0"]) == 0
    assert sf.info(out / "lofi-piano_s0.wav").frames == 32000
    entry = _manifest(out)["files"][0]
    assert entry["settings"]["audio_prompt"] == str(tmp_path / "intro.wav") and entry["frames"] == 50


def test_one_prompt_file_reader_for_inference_and_evaluation(tmp_path):
    """inference_lora and evaluate read prompts files the same way: UTF-8 with or without a
    byte-order mark, 'text' / 'prompt' / 'caption' as the prompt's key, every problem collected and
    named."""
    from lora.common.cli import UserError
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
