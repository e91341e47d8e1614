"""The training step (lora.training.step): under gradient accumulation the objective weighs tokens,
not micro-batches, so a batch of four and two accumulated batches of two train the same."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch


@pytest.fixture(scope="module")
def lora_step(tiny_model_dir):
    from lora.config import LoraSection, ModelConfig
    from lora.dataset import CachedClip, CachedTokenDataset, collate_tokens
    from lora.modeling.adapter import attach_lora
    from lora.modeling.loading import load_base_model
    from lora.training.step import step_loss

    model, processor, info = load_base_model(ModelConfig(model_path=str(tiny_model_dir)))
    torch.manual_seed(0)
    model = attach_lora(model, LoraSection(lora_dropout=0.0))
    for _n, p in model.named_parameters():  # non-zero B: every LoRA matrix gets a gradient
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    model.eval()  # no dropout: the comparison is exact up to float rounding
    g = torch.Generator().manual_seed(1)
    lengths = [12, 20, 70, 90]  # short and long clips, as length bucketing over 5-30 s clips gives
    clips = [CachedClip(id=str(i), text="x", split="train",
                        codes=torch.randint(0, info.vocab_size, (info.num_codebooks, n),
                                            generator=g).short(),
                        hidden=torch.randn(4, info.text_hidden_size, generator=g),
                        mask=torch.ones(4, dtype=torch.long))
             for i, n in enumerate(lengths)]
    ds = CachedTokenDataset(clips, 100, train=False)

    def batch(idx):
        return collate_tokens([ds[i] for i in idx], info.pad_token_id)

    def loss_fn(b):
        return step_loss(model, processor, info, b, torch.device("cpu"), nullcontext, cache_text=True)

    return model, batch, loss_fn


def _grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


def test_one_batch_of_four_equals_two_accumulated_batches_of_two_on_unequal_lengths(lora_step):
    from lora.training.step import accumulate

    model, batch, loss_fn = lora_step
    one = accumulate(loss_fn, [batch([0, 1, 2, 3])], lambda loss: loss.backward(), seeds=[0])
    g_one = _grads(model)
    two = accumulate(loss_fn, [batch([0, 1]), batch([2, 3])], lambda loss: loss.backward(), seeds=[0, 1])
    g_two = _grads(model)
    assert one.samples == two.samples == 4
    torch.testing.assert_close(two.loss, one.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two.per_codebook, one.per_codebook, rtol=1e-5, atol=1e-6)
    for n in g_one:
        torch.testing.assert_close(g_two[n], g_one[n], rtol=1e-4, atol=1e-7)
    # The old rule (each micro-batch's mean counts equally) weighs the short clips' tokens ~4x more
    # here.
    a, b = loss_fn(batch([0, 1])).loss, loss_fn(batch([2, 3])).loss
    ((a + b) / 2).backward()
    g_old = _grads(model)
    assert abs(float((a + b) / 2) - float(one.loss)) > 1e-3
    assert any(not torch.allclose(g_old[n], g_one[n], rtol=1e-3, atol=1e-6) for n in g_one)


def test_equal_micro_batches_weigh_exactly_one_over_the_accumulation(lora_step):
    """With equal lengths the token weight is 1/accumulation, bit for bit (so runs on equal-length
    clips, like the example set, train exactly as before the change)."""
    from lora.training.step import accumulate

    model, batch, loss_fn = lora_step
    seen = []
    accumulate(loss_fn, [batch([2]), batch([2]), batch([2]), batch([2])], seen.append, seeds=[0, 1, 2, 3])
    plain = loss_fn(batch([2])).loss
    assert all(torch.equal(s, plain * 0.25) and torch.equal(s, plain / 4) for s in seen)
