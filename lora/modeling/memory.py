"""The least memory a batch needs, checked against the machine before the batch is allocated: a
batch size in the hundred thousands is a message naming the setting, not a process the kernel kills.

The floors are lower bounds (what the step cannot do without), so a batch they refuse can never
run; a batch they accept may still run out of memory (then torch says so, and the scripts turn a
GPU's out-of-memory error into a message). They use the decoder's size from the model family
(``decoder_shape``): layers x hidden size.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from lora.common.cli import UserError, human_bytes
from lora.modeling.loading import family_for
from lora.modeling.musicgen import get_base

if TYPE_CHECKING:
    import torch
    from torch import nn


def total_memory(device) -> Optional[int]:
    """Bytes of memory of ``device`` (a GPU's, or the machine's RAM for the CPU); None where it is
    not known."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # (not a POSIX system)
        return None


def _decoder_size(model: nn.Module) -> tuple[int, int]:
    """(layers, hidden size) of the decoder."""
    base = get_base(model)
    shape = family_for(base).decoder_shape(base.config)
    return int(shape["num_hidden_layers"]), int(shape["hidden_size"])


def training_floor(model: nn.Module, batch_size: int, frames: int) -> int:
    """A training step keeps at least each layer's input for the backward pass (all that gradient
    checkpointing keeps), in 16-bit at the least: batch x frames x layers x hidden x 2 bytes."""
    layers, hidden = _decoder_size(model)
    return int(batch_size) * int(frames) * layers * hidden * 2


def generation_floor(model: nn.Module, batch_size: int, frames: int, guidance: bool,
                     dtype: torch.dtype) -> int:
    """Decoding keeps each layer's keys and values of every frame, for both halves of classifier-free
    guidance: batch x (2 with guidance) x layers x 2 x frames x hidden x the dtype's bytes."""
    import torch

    layers, hidden = _decoder_size(model)
    size = torch.empty((), dtype=dtype).element_size()
    return int(batch_size) * (2 if guidance else 1) * layers * 2 * int(frames) * hidden * size


def check_fits(need: int, device, what: str, fix: str) -> None:
    """UserError when ``need`` bytes (a floor) exceed all the memory ``device`` has; ``what`` says
    what needs it, ``fix`` which setting to lower."""
    have = total_memory(device)
    if have is not None and need > have:
        where = "GPU memory" if str(device).startswith("cuda") else "memory (RAM)"
        raise UserError(f"{what} needs at least {human_bytes(need)} of {where}, and this machine has "
                        f"{human_bytes(have)} in all. Nothing was allocated. {fix}")
