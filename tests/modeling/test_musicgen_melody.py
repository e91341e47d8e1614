"""MusicGen-Melody as a second model family (lora.modeling.musicgen_melody), checked against
transformers' own MusicgenMelodyForConditionalGeneration on tiny random melody models (mono and
stereo): the conditioning prefix, the training loss, the null condition and greedy generation; then
the token cache, training, inference, evaluation and export of a melody fine-tune (its chroma:
tests/modeling/test_chroma.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import SR, tones, tune_chroma


@pytest.fixture(scope="module", params=["mono", "stereo"])
def melody(request, tmp_path_factory):
    from lora.modeling import musicgen_melody as M
    from lora.modeling.tiny_model import ensure_tiny_model

    d = ensure_tiny_model(tmp_path_factory.mktemp("tiny_melody") / request.param,
                          stereo=request.param == "stereo", melody=True)
    model = M.from_pretrained(str(d), "sdpa").eval()
    return model, M.load_processor(str(d)), M.model_info(model, str(d), "test")


# --------------------------------------------------------------------------------------------
# The prefix and the loss
# --------------------------------------------------------------------------------------------
def _batch(model, processor, info, texts=("deep house groove 120 BPM", "ambient pad"), frames=20):
    from lora.modeling import musicgen_melody as M

    hidden, mask = M.encode_text(model, processor, list(texts))
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, info.vocab_size, (len(texts), info.num_codebooks, frames), generator=g)
    lengths = torch.tensor([frames] + [frames - 5] * (len(texts) - 1))
    tokens = processor(text=list(texts), padding=True, return_tensors="pt")
    return hidden, mask, codes, lengths, tokens


def _ours(model, info, codes, lengths, hidden, mask, chroma):
    from lora.modeling import musicgen_melody as M

    logits, labels = M.teacher_forced_logits(model, info, codes, lengths, hidden, mask, chroma=chroma)
    return logits, labels, M.codebook_loss(logits, labels)


def test_loss_equals_transformers_melody_forward_with_labels(melody):
    model, processor, info = melody
    hidden, mask, codes, lengths, tokens = _batch(model, processor, info)
    ch = tune_chroma()
    chroma = torch.stack([ch, torch.roll(ch, 3, dims=-1)])
    logits, labels, loss = _ours(model, info, codes, lengths, hidden, mask, chroma)
    ref = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                input_features=chroma, labels=labels)
    # (B*K, chroma_length + L + S, V): prefix positions included
    assert logits.shape == ref.logits.shape
    assert torch.equal(logits, ref.logits)
    assert float(loss.loss) == pytest.approx(float(ref.loss), rel=1e-6, abs=1e-6)


def test_the_melody_reaches_the_model_and_its_frames_are_in_order(melody):
    """The equality above must break when the prefix is wrong: no chroma (the null melody), or the
    tune shifted by one frame (a random tiny decoder moves the loss little, so the logits are
    compared)."""
    model, processor, info = melody
    hidden, mask, codes, lengths, tokens = _batch(model, processor, info, texts=("piano chords",))
    chroma = tune_chroma()[None]
    logits, labels, _ = _ours(model, info, codes, lengths, hidden, mask, chroma)
    ref = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                input_features=chroma, labels=labels).logits
    assert torch.equal(logits, ref)
    for wrong in (None, torch.roll(chroma, 1, dims=1)):
        other, _, _ = _ours(model, info, codes, lengths, hidden, mask, wrong)
        assert (other - ref).abs().max() > 1e-4


def test_no_melody_is_transformers_null_melody(melody):
    """Without input_features transformers conditions on a one-hot of bin 0: ours with chroma None
    is that."""
    model, processor, info = melody
    hidden, mask, codes, lengths, tokens = _batch(model, processor, info)
    logits, labels, _ = _ours(model, info, codes, lengths, hidden, mask, None)
    ref = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], labels=labels)
    assert torch.equal(logits, ref.logits)


def test_dropped_condition_is_generate_null(melody):
    """Conditioning dropout gives, row by row, what generate's unconditional half is: zero text of
    the same length and the bin-0 melody; melody dropout alone keeps the text."""
    from lora.modeling import musicgen_melody as M

    model, processor, info = melody
    hidden, mask, _, _, _ = _batch(model, processor, info)
    chroma = torch.stack([tune_chroma()] * 2)
    keep, keep_melody = torch.tensor([False, True]), torch.tensor([True, False])
    h, m, c = M.drop_melody_condition(hidden, mask, keep, chroma, keep_melody)
    uh, um = M.with_unconditional(hidden, mask)
    got = M.prefix(model, h, m, c)
    unconditional = M.prefix(model, uh, um, M.with_unconditional_melody(chroma))
    n = info.chroma_length
    # row 0 dropped: exactly generate's null row
    assert torch.equal(got[0], unconditional[2])
    # row 1 keeps its text
    assert torch.equal(got[1, n:], M.prefix(model, hidden, mask, chroma)[1, n:])
    # and gets the null melody
    assert torch.equal(got[1, :n], M.prefix(model, hidden, mask, None)[1, :n])
    # the dataset's per-clip form of the same null
    one = M.dropped_text(hidden[0], mask[0])
    assert torch.equal(M.prefix(model, one[0][None], one[1][None], M.null_like(chroma[:1])),
                       unconditional[2:3])


# --------------------------------------------------------------------------------------------
# Greedy generation
# --------------------------------------------------------------------------------------------
def _greedy(model, info, hidden, mask, chroma, n_frames: int, guidance: float):
    """Greedy decoding with the family's functions (delay pattern, CFG halves, cached step)."""
    from lora.modeling import musicgen_melody as M

    b, K = hidden.shape[0], info.num_codebooks
    start = torch.full((b * K, 1), info.decoder_start_token_id, dtype=torch.long)
    _, pattern = M.generation_pattern(model, start, info.pad_token_id, n_frames
                                      + info.codebooks_per_channel)
    h, m, c = hidden, mask, chroma
    if guidance > 1:
        h, m = M.with_unconditional(hidden, mask)
        c = None if chroma is None else M.with_unconditional_melody(chroma)
    seq, cache = start, None
    while seq.shape[1] < pattern.shape[1]:
        step_in = seq if cache is None else seq[:, -1:]
        ids = torch.cat([step_in, step_in]) if guidance > 1 else step_in
        logits, cache = M.cached_step(model, h, m, ids, cache, c)
        if guidance > 1:
            cond, uncond = logits.split(b * K)
            logits = uncond + (cond - uncond) * guidance
        nxt = logits.argmax(dim=-1)[:, None]
        col = pattern[:, seq.shape[1]: seq.shape[1] + 1]
        nxt = torch.where(col == -1, nxt, col)
        seq = torch.cat([seq, nxt], dim=1)
    return M.frames_from_pattern(seq, n_frames, info)


@pytest.mark.parametrize("with_melody", [True, False])
def test_greedy_tokens_equal_transformers_generate(melody, with_melody, monkeypatch):
    """Greedy decoding with guidance 3 through the family's functions gives transformers' generate()
    tokens, with a melody and without (the null melody), mono and stereo. generate() returns audio:
    its codes are caught where it hands them to EnCodec."""
    from lora.modeling import musicgen_melody as M

    model, processor, info = melody
    texts = ["techno drums 128 BPM", "piano"]
    hidden, mask = M.encode_text(model, processor, texts)
    tokens = processor(text=texts, padding=True, return_tensors="pt")
    chroma = torch.stack([tune_chroma(),
                          torch.roll(tune_chroma(), 5, dims=-1)]) if with_melody else None
    n = 12
    ours = _greedy(model, info, hidden, mask, chroma, n, guidance=3.0)

    caught = []
    codec = M.audio_codec(model)
    decode = codec.decode
    monkeypatch.setattr(codec, "decode", lambda codes, *a,
                        **k: (caught.append(codes[0]), decode(codes, *a, **k))[1])
    kw = {"input_features": chroma} if with_melody else {}
    steps = n + info.codebooks_per_channel - 1  # the delay pattern's extra steps
    model.generate(**tokens, **kw, do_sample=False, guidance_scale=3.0, max_new_tokens=steps)
    ref = caught[0] if info.audio_channels == 1 else torch.stack([caught[0], caught[1]],
                                                                 dim=2).flatten(1, 2)
    assert ours.shape == ref.shape == (2, info.num_codebooks, n)
    assert torch.equal(ours, ref)


def test_a_melody_folder_loads_through_the_same_path_as_musicgen(tmp_path):
    """load_base_model (from_pretrained on a folder: the path facebook/musicgen-melody takes) picks
    the melody family from config.json; its processor needs no torchaudio."""
    from lora.config import ModelConfig
    from lora.modeling.loading import family_for, load_base_model

    model, processor, info = load_base_model(ModelConfig(model_path="tiny-melody",
                                                         tiny_model_dir=str(tmp_path)))
    assert type(model).__name__ == "MusicgenMelodyForConditionalGeneration"
    assert info.model_type == "musicgen_melody" and info.chroma_length == 235 and info.num_chroma == 12
    assert family_for(info).MELODY and not family_for("musicgen").MELODY
    assert processor(text=["piano"], return_tensors="pt")["input_ids"].shape[0] == 1
    assert (tmp_path / "mono-melody" / "preprocessor_config.json").is_file()


# --------------------------------------------------------------------------------------------
# The token cache, the dataset and training
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def melody_run(tmp_path_factory):
    """Example data, the tiny melody model and a short training run on them (fp32, 10 steps)."""
    from lora import prepare_data, train_lora

    root = tmp_path_factory.mktemp("melody_run")
    data = root / "data"
    assert prepare_data.main(["--create_example", "--output_dir", str(data), "--example_clips", "16",
                              "--example_seconds", "4"]) == 0
    out = root / "out"
    rc = train_lora.main(["--model_path", "tiny-melody", "--tiny_model_dir", str(root / "tiny"),
                          "--data_dir",
                          str(data), "--metadata_file", "metadata.json", "--output_dir", str(out),
                          "--lora_rank",
                          "12", "--lora_alpha", "24", "--batch_size", "2", "--num_epochs", "5",
                          "--learning_rate",
                          "0.003", "--mixed_precision", "no", "--eval_steps", "5", "--save_steps", "5"])
    assert rc == 0
    return root, data, out


def _cached(root, data):
    from lora.config import ModelConfig
    from lora.dataprep.token_cache import build_token_cache
    from lora.dataset import load_metadata
    from lora.modeling.loading import load_base_model

    model, processor, info = load_base_model(ModelConfig(model_path="tiny-melody",
                                                         tiny_model_dir=str(root / "tiny")))
    records = load_metadata(data)
    clips, stats = build_token_cache(records, model, processor, info, data, show_progress=False)
    return model, processor, info, records, clips, stats


@pytest.mark.slow
def test_the_cache_holds_each_clip_s_own_chroma(melody_run):
    import soundfile as sf

    from lora.modeling import chroma as C

    root, data, _ = melody_run
    _, _, info, records, clips, stats = _cached(root, data)
    assert stats["clips_encoded"] == 0  # training built it: reused, chroma included
    for rec, clip in list(zip(records, clips))[:3]:
        wav, sr = sf.read(str(rec.path), dtype="float32", always_2d=True)
        assert sr == info.sample_rate
        expected = C.chroma(wav.T, sr, max_seconds=None).argmax(dim=-1)
        assert clip.chroma is not None and torch.equal(clip.chroma.long(), expected)
        assert clip.chroma.shape[0] == C.frames(wav.shape[0])


@pytest.mark.slow
def test_a_training_crop_takes_the_chroma_frames_that_cover_it(melody_run):
    from lora.dataset import CachedTokenDataset
    from lora.modeling import chroma as C
    from lora.modeling import musicgen_melody as M

    root, data, _ = melody_run
    _, _, info, _, clips, _ = _cached(root, data)
    clip = clips[0]
    frames = 100  # 2 s crops of a 4-s clip
    ds = CachedTokenDataset([clip], frames, seed=3, train=True, info=info)
    for epoch in range(4):
        ds.set_epoch(epoch)
        item = ds[0]
        start = next(s for s in range(clip.num_frames - frames + 1)
                     if torch.equal(clip.codes[:, s:s + frames].long(), item["codes"]))
        first = round(start * 640 / C.HOP)
        want = M.melody_frames(clip.chroma[first:first + C.frames(frames * 640)], info.chroma_length)
        assert torch.equal(item["chroma"], want)
    assert item["chroma"].shape == (info.chroma_length, 12)


@pytest.mark.slow
def test_dropped_items_carry_generate_s_null_condition(melody_run):
    from lora.dataset import CachedTokenDataset, collate_tokens
    from lora.modeling import musicgen_melody as M

    root, data, _ = melody_run
    model, _, info, _, clips, _ = _cached(root, data)
    both = CachedTokenDataset(clips[:8], 200, seed=0, train=True, cond_dropout=0.999, info=info)
    melody_only = CachedTokenDataset(clips[:8], 200, seed=0, train=True, cond_dropout=0.0,
                                     melody_dropout=0.999, info=info)
    kept = CachedTokenDataset(clips[:8], 200, seed=0, train=False, info=info)
    for i in range(8):
        a, b, k = both[i], melody_only[i], kept[i]
        assert a["dropped"] and b["melody_dropped"] and not b["dropped"] and not k["melody_dropped"]
        assert torch.equal(a["chroma"], M.null_like(k["chroma"])) and torch.equal(b["chroma"],
                                                                                  a["chroma"])
        assert a["hidden"].shape == k["hidden"].shape and not a["hidden"].any() and not a["mask"].any()
        assert torch.equal(b["hidden"], k["hidden"])
        # the length generation pads the caption to
        assert k["hidden"].shape[0] % M.TEXT_PAD_MULTIPLE == 0
    batch = collate_tokens([both[0], kept[1]], info.pad_token_id)
    uh, um = M.with_unconditional(batch["hidden"][1:], batch["mask"][1:])
    got = M.prefix(model, batch["hidden"], batch["mask"], batch["chroma"])
    null = M.prefix(model, uh, um, M.with_unconditional_melody(batch["chroma"][1:]))
    assert torch.equal(got[0], null[1])  # the dropped row is generate's unconditional row


@pytest.mark.slow
def test_melody_training_learns_and_saves_a_standard_adapter(melody_run):
    import json

    from peft import PeftModel
    from transformers import MusicgenMelodyForConditionalGeneration

    root, _, out = melody_run
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) >= 3 and val[-1] < val[0] - 0.05
    cfg = json.loads((out / "best_model" / "adapter_config.json").read_text())
    assert all("self_attn" in t for t in cfg["target_modules"]) if isinstance(cfg["target_modules"],
                                                                              list) else True
    base = MusicgenMelodyForConditionalGeneration.from_pretrained(str(root / "tiny" / "mono-melody"))
    model = PeftModel.from_pretrained(base, str(out / "best_model"))
    assert any("lora_A" in n for n, _ in model.named_parameters())


# --------------------------------------------------------------------------------------------
# The generation engine (lora.generation) on melody models
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoding", ["static", "transformers"])
@pytest.mark.parametrize("with_melody", [True, False])
def test_generate_follows_transformers_greedy_with_the_melody(melody, with_melody, decoding, monkeypatch):
    """lora.generation.engine.generate (the engine of inference_lora.py) on a melody model: greedy
    tokens equal transformers' generate() given the same melody and the caption padded to the length
    ours uses (text_length: in a prefix model the padded length is part of the condition)."""
    from lora.generation import engine, requests
    from lora.modeling import musicgen_melody as M

    model, processor, info = melody
    n = 10
    melody_audio = np.concatenate([tones([440.0], 1.0), tones([261.63], 1.0), tones([329.63], 1.0)])
    chroma, mid = engine.melody_from_audio(melody_audio, info) if with_melody else (None, "")
    req = requests.Request(prompt="techno drums 128 BPM", seed=0, duration=n / info.frame_rate,
                    sampling=requests.SamplingSettings(do_sample=False), melody=chroma, melody_id=mid)
    ours = engine.generate(model, processor, info, [req], progress=False, decoding=decoding)[0]
    assert ours.decoding == decoding

    caught = []
    codec = M.audio_codec(model)
    decode = codec.decode
    monkeypatch.setattr(codec, "decode", lambda codes, *a,
                        **k: (caught.append(codes[0]), decode(codes, *a, **k))[1])
    tokens = processor(text=[req.prompt], padding="max_length", max_length=ours.text_length,
                       return_tensors="pt")
    kw = {"input_features": chroma[None]} if with_melody else {}
    model.generate(**tokens, **kw, do_sample=False, guidance_scale=3.0,
                   max_new_tokens=n + info.codebooks_per_channel - 1)
    ref = caught[0][0] if info.audio_channels == 1 else torch.stack([caught[0][0], caught[1][0]],
                                                                    1).flatten(0, 1)
    assert torch.equal(ours.codes, ref)


def test_a_later_window_follows_the_periodically_extended_tune(melody):
    """A piece of several windows extends the tune periodically (audiocraft's
    MusicGen._generate_tokens wraps the waveform): a window takes the tune from its own start, and a
    window past the tune's end wraps around to its beginning instead of the null melody.
    (tests/generation/test_melody_generation.py compares with audiocraft's rule frame by frame.)"""
    from lora.generation import engine, requests
    from lora.modeling import chroma as C
    from lora.modeling import musicgen_melody as M

    _, _, info = melody
    tune = tune_chroma(6.0)  # A, C, E: 2 s each
    req = requests.Request(prompt="x", seed=0, duration=40.0, melody=tune, melody_samples=6 * SR)
    start = 2 * info.frame_rate  # a window that starts 2 s in
    got = engine.window_melody(info, [req, requests.Request(prompt="y", seed=1, duration=40.0)],
                               requests.Window(start, 0, 10), 3.0, "cpu", periodic=True)
    names = C.dominant_pitch_classes(got[0])
    assert names[2] == "C" and names[20] == "E" and names[34] == "A"  # 2.3, 4.6, 6.4 s into the tune
    # no melody; CFG
    assert torch.equal(got[1], M.null_like(got[0])) and torch.equal(got[2], M.null_like(got[0]))
    past = engine.window_melody(info, [req], requests.Window(60 * info.frame_rate, 0, 10), 1.0, "cpu",
                                periodic=True)
    assert C.dominant_pitch_classes(past[0])[2] == "A"  # 60 s = ten times round: the tune's start
    one = engine.window_melody(info, [req], requests.Window(0, 0, 10), 1.0, "cpu")
    assert torch.equal(one[0], M.melody_frames(tune.argmax(-1), info.chroma_length))  # one window


def test_a_silent_melody_is_refused():
    from lora.generation import engine, requests

    class Info:
        sample_rate = 32000

    with pytest.raises(requests.GenerationError, match="silent"):
        engine.melody_from_audio(np.zeros((1, 32000), dtype=np.float32), Info())


# --------------------------------------------------------------------------------------------
# inference_lora.py with a melody
# --------------------------------------------------------------------------------------------
def _tune_file(path):
    import soundfile as sf

    wav = np.concatenate([tones([440.0], 1.0), tones([261.63], 1.0), tones([329.63], 1.0)]) * 0.5
    sf.write(str(path), wav, SR)
    return path


@pytest.mark.slow
def test_inference_follows_a_melody_file_and_records_it(melody_run, tmp_path):
    import json

    from lora import inference_lora

    root, _, out = melody_run
    tune = _tune_file(tmp_path / "tune.wav")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": "piano", "melody": "tune.wav", "seed": 3}) + "\n"
                       + json.dumps({"text": "piano", "seed": 3}) + "\n")
    gen = tmp_path / "gen"
    args = ["--model_path", "tiny-melody", "--tiny_model_dir", str(root / "tiny"), "--lora_model_path",
            str(out / "best_model"), "--prompts_file", str(prompts), "--duration", "1",
            "--do_sample", "false", "--output_dir", str(gen)]
    assert inference_lora.main(args) == 0
    files = json.loads((gen / "manifest.json").read_text())["files"]
    with_tune = next(f for f in files if f["melody"])
    without = next(f for f in files if not f["melody"])
    assert with_tune["melody"]["file"] == str(tune.resolve()) and len(with_tune["melody"]["sha1"]) == 40
    assert with_tune["tokens_sha1"] != without["tokens_sha1"]  # the melody changed the music
    # --melody_audio gives every prompt that tune: the same tokens as the prompts file's per-prompt melody
    again = tmp_path / "again"
    assert inference_lora.main(args[:6]
                               + ["--prompts", "piano", "--seed", "3", "--melody_audio", str(tune),
                                           "--duration", "1", "--do_sample", "false", "--output_dir",
                                           str(again)]) == 0
    assert json.loads((again
                       / "manifest.json").read_text())["files"][0]["tokens_sha1"] == with_tune["tokens_sha1"]


@pytest.mark.slow
@pytest.mark.parametrize("case",
                         ["missing", "unreadable", "silent", "text_model",
                          "melody_adapter_on_text_model"])
def test_bad_melody_input_is_a_message_and_nothing_is_written(melody_run, tmp_path, tiny_model_dir, case):
    import soundfile as sf

    from lora import inference_lora
    from lora.common.cli import UserError

    root, _, out = melody_run
    tune = _tune_file(tmp_path / "tune.wav")
    model, adapter, melody = "tiny-melody", "none", str(tune)
    if case == "missing":
        melody, want = str(tmp_path / "nope.wav"), "melody_audio file not found: .*nope.wav"
    elif case == "unreadable":
        (tmp_path / "bad.wav").write_text("not audio")
        melody, want = str(tmp_path / "bad.wav"), "melody_audio: .*bad.wav"
    elif case == "silent":
        sf.write(str(tmp_path / "quiet.wav"), np.zeros(SR, dtype=np.float32), SR)
        melody, want = str(tmp_path / "quiet.wav"), "quiet.wav: The melody audio is silent"
    elif case == "text_model":
        model, want = str(tiny_model_dir), "needs a melody model .* is a text-only MusicGen"
    else:
        model, adapter, melody = str(tiny_model_dir), str(out / "best_model"), None
        want = "'musicgen_melody' model, but the base model in use .* 'musicgen' model"
        # (the adapter's recorded base is the tiny melody folder: rename the check's name test away)
    args = ["--model_path", model, "--tiny_model_dir", str(root / "tiny"), "--lora_model_path", adapter,
            "--prompts", "piano", "--duration", "1", "--output_dir", str(tmp_path / "gen")]
    if melody:
        args += ["--melody_audio", melody]
    with pytest.raises(UserError, match=want):
        inference_lora.main(args)
    assert not (tmp_path / "gen").exists() or not any((tmp_path / "gen").iterdir())


# --------------------------------------------------------------------------------------------
# evaluate.py --compare on a melody model
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_evaluate_compare_reports_likelihood_and_chroma_similarity_with_its_floor(melody_run, tmp_path):
    import json

    from lora import evaluate

    root, data, out = melody_run
    ev = tmp_path / "eval"
    rc = evaluate.main(["--model_path", "tiny-melody", "--tiny_model_dir", str(root / "tiny"),
                        "--lora_model_path",
                        str(out / "best_model"), "--data_dir", str(data), "--output_dir", str(ev),
                        "--compare",
                        "--num_prompts", "2", "--eval_seeds", "1", "--eval_duration", "1.0",
                        "--bootstrap_samples", "200"])
    assert rc == 0
    res = json.loads((ev / "results.json").read_text())
    lk = res["likelihood"]
    # the held-out likelihood (each clip with its own melody) improved
    assert lk["lora"]["ce"] < lk["base"]["ce"]
    mel = res["generation"]["melody"]
    assert len(mel["sources"]) == 2 and all(p.endswith(".wav") for p in mel["sources"])
    for m in ("base", "lora"):
        n = len(res["generation"]["distance_set"]["pair_indices"])
        assert len(mel[m]["per_clip"]) == n
        assert mel[m]["shuffled_mean"] is not None
    rows = {r["metric"]: r for r in res["summary"]}
    assert rows["chroma similarity to the melody"]["base"] == pytest.approx(mel["base"]["mean"])
    assert "chroma similarity, shuffled melody (floor)" in rows
    assert "chroma similarity to the melody" in (ev / "report.html").read_text()


def test_static_decoder_logits_equal_transformers_forward_with_the_prefix(melody):
    """The static-cache step (prefill, then one token at a time) gives transformers' logits at every
    position."""
    from lora.modeling import musicgen_melody as M

    model, processor, info = melody
    hidden, mask, codes, lengths, tokens = _batch(model, processor, info)
    chroma = torch.stack([tune_chroma(), torch.roll(tune_chroma(), 2, dims=-1)])
    dec_in, _ = M.build_delay_pattern(codes, lengths, info)
    ref = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                input_features=chroma, decoder_input_ids=dec_in).logits
    S = dec_in.shape[-1]
    static = M.StaticDecoder(M.get_base(model), hidden, mask, rows=2, max_len=S, chroma=chroma)
    got = [static.prefill(dec_in[:, :3])]
    for pos in range(3, S):
        got.append(static.step(dec_in[:, pos], pos))
    want = ref[:, -S:][:, 2:]  # the logits of positions 2 .. S-1 of the tokens
    torch.testing.assert_close(torch.stack(got, dim=1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_melody_fine_tune_exports_to_a_plain_melody_model(melody_run, tmp_path):
    """export_model.py on a melody adapter: a MusicgenMelodyForConditionalGeneration folder that
    loads in transformers and, as --model_path, generates with a melody the tokens of the merged
    fine-tune."""
    import json

    from transformers import MusicgenMelodyForConditionalGeneration

    from lora import export_model, inference_lora

    root, _, out = melody_run
    tune = _tune_file(tmp_path / "tune.wav")
    merged = tmp_path / "merged"
    assert export_model.main(["--base_model_path", "tiny-melody", "--tiny_model_dir", str(root / "tiny"),
                              "--lora_model_path", str(out / "best_model"), "--output_dir",
                              str(merged)]) == 0
    assert isinstance(MusicgenMelodyForConditionalGeneration.from_pretrained(str(merged)),
                      MusicgenMelodyForConditionalGeneration)
    assert (merged / "preprocessor_config.json").is_file()
    common = ["--prompts", "piano", "--melody_audio", str(tune), "--duration", "1", "--do_sample",
              "false", "--dtype", "float32"]
    assert inference_lora.main(["--model_path", "tiny-melody", "--tiny_model_dir", str(root / "tiny"),
                                "--lora_model_path", str(out / "best_model"), *common, "--output_dir",
                                str(tmp_path / "a")]) == 0
    assert inference_lora.main(["--model_path", str(merged), "--lora_model_path", "none", *common,
                                "--output_dir", str(tmp_path / "b")]) == 0
    sha = [json.loads((tmp_path / d / "manifest.json").read_text())["files"][0]["tokens_sha1"]
           for d in "ab"]
    assert sha[0] == sha[1]
