"""Auto-captions are CLAP's (lora/dataprep/autocaption.py): on a tiny random CLAP built from config,
the tag scores equal transformers' pipeline("zero-shot-audio-classification") for the same labels;
a recording's tags come from its clips' averaged embeddings; bad vocabulary files are messages
naming the file and the key; captions the user gave are kept unless asked; metadata.json records
each caption's source and the tags with their scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from lora import prepare_data
from lora.common.cli import UserError
from lora.common.fields import ConfigError
from lora.dataprep import autocaption as AC
from lora.modeling import clap
from tests.conftest import write_songs

SR = 32000


@pytest.fixture(scope="module")
def pipe(tiny_clap_dir):
    from transformers import pipeline

    return pipeline("zero-shot-audio-classification", model=str(tiny_clap_dir))


def _vocab(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _noise(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    return (0.2 * np.sin(2 * np.pi * (200 + 100 * seed) * t) + 0.05 * rng.normal(size=t.size)).astype(np.float32)


@pytest.mark.parametrize("seconds", [3.0, 10.0])
def test_tag_scores_equal_the_zero_shot_pipeline(tiny_clap_dir, pipe, seconds):
    vocab = AC.read_vocabularies(None)  # the shipped vocabularies, their own prompts
    tagger = AC.Tagger(vocab, str(tiny_clap_dir), local_files_only=True)
    wav = _noise(seconds, 1)
    probs = tagger.probabilities(tagger.embed(wav, SR))
    import soxr

    at48 = soxr.resample(wav, SR, 48000).astype(np.float32)
    for v in vocab.items:
        ref = {r["label"]: r["score"] for r in pipe(at48, candidate_labels=v.labels,
                                                     hypothesis_template=v.prompt)}
        np.testing.assert_allclose(probs[v.name], [ref[x] for x in v.labels], atol=2e-6)
        assert probs[v.name].max() - probs[v.name].min() > 1e-3  # scores that tell labels apart
        tags = tagger.tags(tagger.embed(wav, SR))[v.name]
        assert tags[0]["label"] == max(ref, key=ref.get) and len(tags) <= v.pick


def test_recording_tags_come_from_the_clips_averaged_embeddings(tiny_clap_dir, tmp_path):
    """The recording's embedding is the renormalised mean of its clips' (each the mean of its
    windows'); per clip, each clip is tagged on its own."""
    import torch.nn.functional as F

    from lora.config import Config

    clips = [_noise(4.0, 1), _noise(13.0, 2)]  # the second has two windows (10 s + 3 s)
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    results = {"a.wav": {"clips": [{"file": f"train/c{i}.wav", "name": f"c{i}.wav"} for i in range(2)]}}
    for i, w in enumerate(clips):
        sf.write(data / f"train/c{i}.wav", w, SR)
    cfg = Config()
    cfg.data.auto_caption_model = str(tiny_clap_dir)
    assert AC.tag_recordings(cfg, data, results, ["a.wav"]) == 1
    tagger = AC.Tagger(AC.read_vocabularies(None), str(tiny_clap_dir), local_files_only=True)
    model, proc = tagger.model, tagger.processor

    def clip_emb(w):  # straight from the model, window by window
        wins = clap.audio_windows(sf.read(data / w, dtype="float32")[0], SR)
        embs = []
        for x in wins:
            fe = proc.feature_extractor([x], sampling_rate=48000, return_tensors="pt")
            with torch.no_grad():
                embs.append(F.normalize(clap.features(model.get_audio_features(**fe)), dim=-1)[0])
        return F.normalize(torch.stack(embs).mean(0), dim=-1)

    rec = F.normalize(torch.stack([clip_emb("train/c0.wav"), clip_emb("train/c1.wav")]).mean(0), dim=-1)
    genre = tagger.vocab.items[0]
    expect = (tagger.scale * tagger.text["genre"] @ rec).softmax(0).numpy()
    got = results["a.wav"]["tags"]["genre"][0]
    assert got["label"] == genre.labels[int(expect.argmax())]
    assert got["score"] == pytest.approx(float(expect.max()), abs=1e-4)
    assert "tags" not in results["a.wav"]["clips"][0]
    # tags are kept while the model, vocabulary and per-clip setting are unchanged
    assert AC.tag_recordings(cfg, data, results, ["a.wav"]) == 0
    cfg.data.auto_caption_per_clip = True
    assert AC.tag_recordings(cfg, data, results, ["a.wav"]) == 1
    assert "tags" not in results["a.wav"]
    for c in results["a.wav"]["clips"]:
        own = (tagger.scale * tagger.text["genre"] @ clip_emb(c["file"])).softmax(0).numpy()
        assert c["tags"]["genre"][0]["score"] == pytest.approx(float(own.max()), abs=1e-4)


@pytest.mark.parametrize("text,key", [
    ("vocabularies:\n  genre:\n    labels: []\n", "vocabularies.genre.labels"),
    ("vocabularies:\n  genre:\n    labels: [rock, jazz, Rock]\n", "duplicate label"),
    ("vocabularies:\n  genre:\n    labels: [rock, jazz\n", "not valid YAML"),
    ("vocabularies:\n  genre:\n    labels: [rock]\n    pick: 2\n", "vocabularies.genre.pick"),
    ("vocabularies:\n  genre:\n    labels: [rock]\n    prompt: no placeholder\n", "vocabularies.genre.prompt"),
    ("vocabularies:\n  Genre Names:\n    labels: [rock]\n", "vocabularies.Genre Names"),
    ("vocabularies:\n  bpm:\n    labels: [fast]\n", "vocabularies.bpm"),
    ("vocabularies:\n  genre:\n    labels: [rock]\n    picks: 1\n", "unknown key"),
    ("genre: [rock, jazz]\n", "vocabularies: expected a mapping"),
])
def test_a_bad_vocabulary_file_is_a_message_naming_file_and_key(tmp_path, text, key):
    path = _vocab(tmp_path / "vocab.yaml", text)
    with pytest.raises(UserError) as e:
        AC.read_vocabularies(str(path))
    assert str(path) in str(e.value) and key in str(e.value)


@pytest.mark.slow
def test_bad_vocabulary_and_template_stop_prepare_data_before_anything_is_written(tmp_path):
    write_songs(tmp_path / "songs", n=2, seconds=3.0)
    bad = _vocab(tmp_path / "v.yaml", "vocabularies:\n  genre:\n    labels: [rock, rock]\n")
    base = ["--input_dir", str(tmp_path / "songs"), "--output_dir", str(tmp_path / "data"), "--auto_caption"]
    with pytest.raises(ConfigError, match=r"v\.yaml.*vocabularies\.genre\.labels: duplicate label"):
        prepare_data.main(base + ["--caption_vocabulary", str(bad)])
    with pytest.raises(ConfigError, match=r"unknown placeholder\(s\) \{tempo\}"):
        prepare_data.main(base + ["--auto_caption_template", "{genre}, {tempo}"])
    with pytest.raises(ConfigError, match="caption_vocabulary: .* not found"):
        prepare_data.main(base + ["--caption_vocabulary", str(tmp_path / "none.yaml")])
    with pytest.raises(ConfigError, match="auto_caption_model: .* is not a CLAP model folder"):
        prepare_data.main(base + ["--auto_caption_model", str(tmp_path / "no_clap")])
    assert not (tmp_path / "data").exists()


def test_render_leaves_out_parts_without_a_value():
    t = "{genre}, {mood}, {bpm} BPM, {key}"
    assert AC.render(t, {"genre": "rock", "mood": "calm, dreamy", "bpm": "120", "key": "A minor"}) == \
        "rock, calm, dreamy, 120 BPM, A minor"
    assert AC.render(t, {"genre": "rock", "mood": "calm"}) == "rock, calm"
    tags = {"genre": [{"label": "rock", "score": 0.81}], "mood": [{"label": "calm", "score": 0.4},
                                                                  {"label": "dreamy", "score": 0.22}]}
    text = AC.tags_text(tags)
    assert text == "genre: rock (0.81); mood: calm (0.40), dreamy (0.22)"
    assert AC.parse_tags_text(text, "x") == {"genre": [{"label": "rock", "score": 0.81}],
                                             "mood": [{"label": "calm", "score": 0.4},
                                                      {"label": "dreamy", "score": 0.22}]}
    with pytest.raises(UserError, match="row 3: tags 'rock' must read"):
        AC.parse_tags_text("rock", "row 3")


@pytest.mark.slow
def test_prepare_writes_auto_captions_only_where_the_user_gave_none(tmp_path, tiny_clap_dir):
    songs = tmp_path / "songs"
    write_songs(songs, n=3, seconds=4.0)
    (songs / "song_0.txt").write_text("my own words")
    base = ["--input_dir", str(songs), "--min_seconds", "2", "--num_workers", "1", "--auto_caption",
            "--auto_caption_model", str(tiny_clap_dir)]
    assert prepare_data.main(base + ["--output_dir", str(tmp_path / "data")]) == 0
    doc = json.loads((tmp_path / "data" / "metadata.json").read_text())
    by_source = {c["source"]: c for c in doc["clips"]}
    assert by_source["song_0.wav"]["text"] == "my own words"
    assert by_source["song_0.wav"]["caption_source"] == "sidecar" and "tags" not in by_source["song_0.wav"]
    for name in ("song_1.wav", "song_2.wav"):
        c = by_source[name]
        assert c["caption_source"] == "auto" and set(c["tags"]) == {"genre", "mood", "instruments"}
        genre = c["tags"]["genre"][0]
        assert 0 < genre["score"] <= 1 and c["text"].startswith(genre["label"] + ", ")
        assert f"{c['bpm']:.0f} BPM" in c["text"] and c["key"] in c["text"]
    report = json.loads((tmp_path / "data" / "prepare_report.json").read_text())
    assert report["caption_sources"] == {"sidecar": 1, "auto": 2}
    # asked to: the user's caption is replaced too
    assert prepare_data.main(base + ["--output_dir", str(tmp_path / "all"), "--auto_caption_replace"]) == 0
    doc = json.loads((tmp_path / "all" / "metadata.json").read_text())
    assert {c["caption_source"] for c in doc["clips"]} == {"auto"}
    assert (songs / "song_0.txt").read_text() == "my own words"
