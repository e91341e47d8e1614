"""The training step and validation: the loss of one micro-batch of cached tokens (``step_loss``),
token-weighted accumulation, the all-reduce of a step's statistics over processes, and the held-out
loss (``heldout_loss``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora.modeling.loading import family_for
from lora.training.model_prep import STATIC_SHAPES_ATTR

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lora.modeling.musicgen import ModelInfo


# ============================================================================================
# The step loss and validation
# ============================================================================================
def step_loss(model: nn.Module, processor, info: ModelInfo, batch, device: torch.device, autocast,
              cache_text: bool):
    """The training (and validation) forward of one micro-batch -> the family's CodebookLoss
    (``.loss`` is the objective, ``.per_codebook`` / ``.tokens`` per codebook).

    Delay-pattern targets from the cached codes; the decoder reads the cached text states (or, when
    the text encoder trains, encodes the captions here and applies the null condition to dropped
    samples) and, for a melody model, the batch's chroma (already the null melody where dropped).
    ``autocast`` is a context-manager factory (``Accelerator.autocast``).
    """
    fam = family_for(info)
    codes = batch["codes"].to(device, non_blocking=True)
    lengths = batch["lengths"].to(device, non_blocking=True)
    melody: dict = {}
    if cache_text:
        hidden = batch["hidden"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
    # the text encoder trains: encode every step, then apply the null condition to dropped samples
    else:
        with autocast():
            hidden, mask = fam.encode_text(model, processor, batch["texts"], device=device)
    if fam.MELODY:  # each clip's own padded text length (before dropout zeroes a mask)
        melody["text_lengths"] = fam.row_text_lengths(mask, batch.get("text_lengths"))
    if not cache_text:
        hidden, mask = fam.drop_condition(hidden, mask, ~batch["dropped"].to(device))
    chroma = batch["chroma"].to(device, non_blocking=True) if "chroma" in batch else None
    shapes = getattr(model, STATIC_SHAPES_ATTR, None)
    b, t = codes.shape[0], codes.shape[-1]
    if shapes is not None:  # torch_compile: pad to a static shape (no loss on the padding)
        codes, lengths, hidden, mask, chroma = shapes.pad(codes, lengths, hidden, mask,
                                                          info.pad_token_id, chroma)
        if "text_lengths" in melody:  # the added rows copy the first clip
            melody["text_lengths"] += melody["text_lengths"][:1] * (codes.shape[0] - b)
    if chroma is not None:
        melody["chroma"] = chroma
    logits, labels = fam.teacher_forced_logits(model, info, codes, lengths, hidden, mask,
                                               autocast=autocast, **melody)
    loss = fam.codebook_loss(logits, labels)
    # per-clip results of the batch's own clips (the padding has no valid token)
    if shapes is not None:
        s = t + (loss.ce.shape[-1] - codes.shape[-1])
        loss.ce, loss.valid = loss.ce[:b, :, :s], loss.valid[:b, :, :s]
    return loss


def heldout_loss(model: nn.Module, processor, info: ModelInfo, valid_ds, collate, batch_size: int,
                 device: torch.device, autocast,
                 cache_text: bool, rank: int = 0, world: int = 1) -> dict:
    """Token-weighted held-out cross-entropy of the model as it is now (eval mode): per codebook and
    their mean, with perplexities. The held-out clips are split over processes and the sums
    all-reduced. Leaves the model in eval mode (the caller sets training mode again)."""
    import torch
    import torch.distributed as dist

    model.eval()
    K = info.num_codebooks
    sums = torch.zeros(K, dtype=torch.float64, device=device)
    counts = torch.zeros(K, dtype=torch.float64, device=device)
    lengths = valid_ds.lengths()
    order = sorted(range(len(valid_ds)), key=lambda i: -lengths[i])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)][rank::world]
    with torch.no_grad():
        for b in batches:
            loss = step_loss(model, processor, info, collate([valid_ds[i] for i in b]), device,
                             autocast, cache_text)
            sums += loss.per_codebook.double() * loss.tokens.double()
            counts += loss.tokens.double()
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    per_cb = (sums / counts.clamp(min=1)).tolist()
    res = {"val_loss": sum(per_cb) / K, "val_ppl": math.exp(min(50.0, sum(per_cb) / K))}
    for k, v in enumerate(per_cb):
        res[f"val_loss_cb{k}"] = v
        res[f"val_ppl_cb{k}"] = math.exp(min(50.0, v))
    res["val_tokens"] = int(counts.sum().item())
    return res


@dataclass
class StepStats:
    """One optimizer step's training loss (the token-weighted objective) and what the logs count,
    for this process's micro-batches; ``all_reduce_step`` makes them the whole step's, over every
    process."""

    loss: object          # scalar tensor
    per_codebook: object  # (K,) tensor
    dropped: int = 0      # samples trained on the null condition
    samples: int = 0


def accumulate(loss_fn, micro_batches: list, backward, seeds: list[int], world: int = 1,
               device: torch.device | None = None) -> StepStats:
    """Forward and backward of one optimizer step's micro-batches (this process's share). Each
    micro-batch is weighted by its share of the step's valid tokens over all processes, so the
    step's gradient is that of the mean cross-entropy over all its tokens (per codebook, then over
    codebooks: what validation reports), whatever the split into micro-batches and processes and
    however long the clips are. (With equal micro-batches the weight is 1 / (accumulation x
    processes), the plain mean.) ``seeds``: the torch seed of each micro-batch (dropout)."""
    import torch
    import torch.distributed as dist

    # Every codebook has one valid token per frame of a clip (the delay pattern shifts, never drops,
    # frames).
    tokens = [float(b["lengths"].sum()) for b in micro_batches]
    total = torch.tensor(sum(tokens), dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(total)
    total = float(total)
    stats = None
    for batch, seed, n in zip(micro_batches, seeds, tokens):
        torch.manual_seed(seed)
        loss = loss_fn(batch)
        w = n / total
        backward(loss.loss * w)
        if stats is None:
            stats = StepStats(loss=loss.loss.detach() * w, per_codebook=loss.per_codebook.detach() * w)
        else:
            stats.loss += loss.loss.detach() * w
            stats.per_codebook += loss.per_codebook.detach() * w
        stats.dropped += int(batch["dropped"].sum())  # CPU tensor: no device sync
        stats.samples += len(batch["dropped"])
    return stats


def all_reduce_step(params, stats: StepStats) -> StepStats:
    """One all-reduce (sum) of every LoRA gradient and of the step's statistics across processes:
    the gradients were weighted by tokens over all processes, so their sum is the whole step's
    gradient, the same as one process with all the micro-batches; the loss, per-codebook losses and
    counts become the whole step's."""
    import torch
    import torch.distributed as dist

    extra = torch.cat([stats.loss.view(1).float(), stats.per_codebook.float(),
                       torch.tensor([stats.dropped, stats.samples], dtype=torch.float32,
                                    device=stats.loss.device)])
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
                      for p in params] + [extra])
    dist.all_reduce(flat)
    off = 0
    for p in params:
        n = p.numel()
        p.grad = flat[off:off + n].view_as(p).to(p.dtype).clone()
        off += n
    k = stats.per_codebook.numel()
    tail = flat[off:]
    return StepStats(loss=tail[0], per_codebook=tail[1:1 + k], dropped=int(round(float(tail[1 + k]))),
                     samples=int(round(float(tail[2 + k]))))
