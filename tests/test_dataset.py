"""lora/dataset.py: the metadata every script reads (a hand-edited metadata.json with a wrong type
is a message naming the entry and the key), and what training reads from the token cache
(CachedTokenDataset's crops and condition dropout, collate_tokens, bucketed_batches)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lora.dataset import CachedClip, CachedTokenDataset, bucketed_batches, collate_tokens
from tests.helpers import sha1s, train_args


@pytest.mark.parametrize("entry, key", [({"offset": None}, "offset"), ({"source": ["a", "b"]}, "source"),
                                        ({"duration": "long"}, "duration")])
def test_hand_edited_metadata_with_wrong_types_is_a_message_in_every_script(entry, key, tmp_path,
                                                                            tiny_model_dir,
                                                                           example_data_dir):
    from lora import evaluate, test_dataset, train_lora
    from lora.common.cli import UserError

    data = tmp_path / "data"
    shutil.copytree(example_data_dir, data, ignore=shutil.ignore_patterns("cache"))
    meta = json.loads((data / "metadata.json").read_text())
    meta["clips"][2].update(entry)
    (data / "metadata.json").write_text(json.dumps(meta))
    before = sha1s(data)
    where = f"entry 2 ({meta['clips'][2]['audio']})"
    for run in (lambda: train_lora.main(train_args(tiny_model_dir, data, tmp_path / "out")),
                lambda: evaluate.main(["--model_path", str(tiny_model_dir), "--data_dir", str(data),
                                       "--lora_model_path", "none", "--output_dir",
                                       str(tmp_path / "ev")]),
                lambda: test_dataset.main(["--data_dir", str(data)])):
        with pytest.raises(UserError) as e:
            run()
        assert where in str(e.value) and f"'{key}'" in str(e.value)
    assert sha1s(data) == before


def _fake_clips(lengths, K=4, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, T in enumerate(lengths):
        L = 1 + i % 5
        out.append(CachedClip(id=f"c{i}", text=f"t{i}", split="train",
                              codes=torch.randint(0, 100, (K, T), generator=g).to(torch.int16),
                              hidden=torch.randn(L, D, generator=g),
                              mask=torch.ones(L, dtype=torch.long)))
    return out


def test_clip_paths_resolve_against_the_data_folder(tmp_path):
    """Every spelling of a clip's path in metadata.json (relative, with ./ or ../, absolute) names
    the file pathlib names; a missing one is a message naming the file and its entry."""
    from lora.common.cli import UserError
    from lora.dataset import load_metadata

    data, other = tmp_path / "data", tmp_path / "other"
    (data / "train").mkdir(parents=True)
    other.mkdir()
    for f in (data / "train" / "a.wav", data / "train" / "b.wav", other / "c.wav", other / "d.wav"):
        f.write_bytes(b"")
    spellings = ["train/a.wav", "./train/b.wav", "../other/c.wav", str(other / "d.wav")]
    clips = [{"audio": a, "text": f"clip {i}", "duration": 1.0, "split": "train"}
             for i, a in enumerate(spellings)]
    (data / "metadata.json").write_text(json.dumps({"clips": clips}))
    records = load_metadata(data)
    assert [r.path for r in records] == [data / "train/a.wav", data / "train/b.wav",
                                         data / "../other/c.wav", other / "d.wav"]
    assert [r.id for r in records] == ["a", "b", "c", "d"] and all(r.path.is_file() for r in records)
    (data / "train" / "b.wav").unlink()
    with pytest.raises(UserError) as e:
        load_metadata(data)
    assert f"entry 1 (./train/b.wav): audio file {data / 'train' / 'b.wav'} is missing" in str(e.value)


def test_crop_is_random_per_epoch_but_deterministic():
    clips = _fake_clips([100, 40, 100, 100])
    ds = CachedTokenDataset(clips, max_frames=30, seed=7, train=True)
    starts = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["codes"].shape == (4, 30) and item["codes"].dtype == torch.long
        full = clips[0].codes.long()
        s = next(s for s in range(71) if torch.equal(full[:, s:s + 30], item["codes"]))
        starts.append(s)
        again = CachedTokenDataset(clips, max_frames=30, seed=7, train=True)
        again.set_epoch(epoch)
        # same (seed, epoch, index) -> same crop
        assert torch.equal(again[0]["codes"], item["codes"])
    assert len(set(starts)) > 1  # a new window most epochs
    # Validation: always the first window, never dropped.
    va = CachedTokenDataset(clips, max_frames=30, seed=7, train=False, cond_dropout=0.9)
    for epoch in range(3):
        va.set_epoch(epoch)
        assert torch.equal(va[0]["codes"], clips[0].codes[:, :30].long()) and not va[0]["dropped"]
    assert ds.lengths() == [30, 30, 30, 30]


def test_cond_dropout_rate_and_null_condition():
    clips = _fake_clips([20] * 400)
    ds = CachedTokenDataset(clips, max_frames=20, seed=3, train=True, cond_dropout=0.3)
    drops = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        drops.append([ds[i]["dropped"] for i in range(len(ds))])
    rate = np.mean(drops)
    assert 0.25 < rate < 0.35
    assert drops[0] != drops[1]  # re-drawn each epoch
    ds.set_epoch(0)
    assert [ds[i]["dropped"] for i in range(len(ds))] == drops[0]  # deterministic
    i = drops[0].index(True)
    item = ds[i]
    assert item["hidden"].shape == (1, 8) and not item["hidden"].any() and item["mask"].tolist() == [0]
    none = CachedTokenDataset(clips, max_frames=20, seed=3, train=True, cond_dropout=0.0)
    assert not any(none[i]["dropped"] for i in range(len(none)))


def test_collate_pads_codes_and_text():
    clips = _fake_clips([12, 7, 9])
    ds = CachedTokenDataset(clips, max_frames=50, seed=0, train=False)
    b = collate_tokens([ds[0], ds[1], ds[2]], pad_token_id=2048)
    assert b["codes"].shape == (3, 4, 12) and b["lengths"].tolist() == [12, 7, 9]
    assert (b["codes"][1, :, 7:] == 2048).all() and torch.equal(b["codes"][1, :, :7],
                                                                clips[1].codes.long())
    assert b["hidden"].shape == (3, 3, 8) and b["mask"].tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert not b["hidden"][0, 1:].any()
    assert b["index"].tolist() == [0, 1, 2] and b["texts"] == ["t0", "t1", "t2"]


def test_bucketed_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 1500, size=101).tolist()
    a = bucketed_batches(lengths, 4, seed=1, epoch=0, bucket_batches=10)
    assert a == bucketed_batches(lengths, 4, seed=1, epoch=0, bucket_batches=10)  # deterministic
    # reshuffled per epoch
    assert a != bucketed_batches(lengths, 4, seed=1, epoch=1, bucket_batches=10)
    flat = sorted(i for b in a for i in b)
    assert flat == list(range(101))  # every item once
    # Similar lengths share a batch: far less padding than random batches.
    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    perm = rng.permutation(101).tolist()
    random_batches = [perm[i:i + 4] for i in range(0, 101, 4)]
    assert padding(a) < 0.3 * padding(random_batches)
    # Extended to a multiple of (accumulation x processes) by wrapping around.
    c = bucketed_batches(lengths, 4, seed=1, epoch=0, multiple_of=8, bucket_batches=10)
    assert len(c) % 8 == 0 and c[:len(a)] == a and c[len(a):] == a[:len(c) - len(a)]


# ------------------------------------------------------------------------------------------
# Classifier-free guidance: null-conditioned samples train the unconditional branch
# ------------------------------------------------------------------------------------------
def test_null_condition_sample_trains_lora(tiny_model_dir):
    from lora.config import LoraSection, ModelConfig
    from lora.dataset import CachedClip, CachedTokenDataset, collate_tokens
    from lora.modeling.adapter import attach_lora
    from lora.modeling.loading import load_base_model
    from lora.modeling.musicgen import build_delay_pattern, codebook_loss, null_condition

    model, processor, info = load_base_model(ModelConfig(model_path=str(tiny_model_dir)))
    model = attach_lora(model, LoraSection(lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    clips = [CachedClip(id=str(i), text="x", split="train",
                        codes=torch.randint(0, info.vocab_size, (info.num_codebooks, 30),
                                            generator=g).short(),
                        hidden=torch.randn(3 + i, info.text_hidden_size, generator=g),
                        mask=torch.ones(3 + i, dtype=torch.long)) for i in range(2)]
    ds = CachedTokenDataset(clips, 30, seed=0, train=True, cond_dropout=0.999)
    batch = collate_tokens([ds[0], ds[1]], info.pad_token_id)
    assert batch["dropped"].all() and not batch["hidden"].any() and not batch["mask"].any()

    dec_in, labels = build_delay_pattern(batch["codes"], batch["lengths"], info)
    # The padded null condition of training = the null condition generate() uses for the
    # unconditional branch.
    model.eval()
    with torch.no_grad():
        h0, m0 = null_condition(2, info)
        ref = model(encoder_outputs=(h0,), attention_mask=m0, decoder_input_ids=dec_in).logits
        got = model(encoder_outputs=(batch["hidden"],), attention_mask=batch["mask"],
                    decoder_input_ids=dec_in).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    model.train()
    logits = model(encoder_outputs=(batch["hidden"],), attention_mask=batch["mask"],
                   decoder_input_ids=dec_in).logits
    codebook_loss(logits, labels).loss.backward()
    self_attn_b = [p.grad for n, p in model.named_parameters() if "self_attn" in n and "lora_B" in n]
    assert self_attn_b and all(gr is not None and gr.abs().sum() > 0 for gr in self_attn_b)
