"""The model a generation runs on: base model + adapter(s) + scale + merge + dtype, on the device it
picks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora.common.cli import log
from lora.config import adapter_paths, adapter_scales
from lora.modeling import adapter as lora_adapter
from lora.modeling.loading import family_for, load_base_model
from lora.modeling.precision import generation_dtype

if TYPE_CHECKING:
    import torch
    from torch import nn


# --------------------------------------------------------------------------------------------
# Loading: base model + adapter + scale + merge + dtype
# --------------------------------------------------------------------------------------------
def pick_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def cast_for_generation(model: nn.Module, dtype) -> None:
    """The decoder (what runs every step) in ``dtype``; EnCodec and T5 stay fp32 (they run once per
    batch and the codec's output is the audio itself)."""
    import torch

    if dtype == torch.float32:
        return
    for module in family_for(model).decoder_modules(model):
        module.to(dtype)


def load_generation_model(cfg, device: torch.device | None = None, adapter_path="__from_cfg__"):
    """Base model (+ LoRA adapter(s) at ``cfg.generation.lora_scale``, merged when asked) ready to
    generate.

    ``adapter_path``: a folder, a list of folders (a mix: one scale each), None for the base model
    alone, or (default) ``cfg.generation.lora_model_path``. Merge: ``cfg.generation.merge``
    True/False, or None = merge when every scale is 1. Returns (model, processor, info,
    adapter_info); adapter_info is None without an adapter, for one adapter a dict (path,
    weights_sha256, base model, rank, alpha, scale, merged), for a mix {"adapters": [each one's
    identity, peft adapter_name and scale], "paths", "scales", "merged"}.
    """
    import torch

    g = cfg.generation
    if adapter_path == "__from_cfg__":
        paths = adapter_paths(g)
    else:
        paths = [] if adapter_path is None else [str(p) for p in (
            adapter_path if isinstance(adapter_path, (list, tuple)) else [adapter_path])]
    scales = adapter_scales(g, len(paths)) if paths else []
    device = torch.device(device) if device is not None else pick_device()
    dtype = generation_dtype(g.dtype, device)
    # Load in fp32 on the CPU: merging LoRA is then exact; the decoder is cast afterwards and only
    # then moved to the device (a GPU never holds the fp32 copy, twice the size of the bf16
    # decoder).
    model, processor, info = load_base_model(cfg.model)
    adapter_info = None
    if paths:
        model, ids = lora_adapter.load_adapters(model, paths, scales)
        merge = g.merge if g.merge is not None else all(s == 1.0 for s in scales)
        if merge:
            model = lora_adapter.merge_lora(model)
        for one in ids:
            log.info("Adapter %s at scale %g (%s)", one["path"], one["scale"],
                     "merged into the weights" if merge else "unmerged")
        if len(ids) == 1:
            adapter_info = {k: v for k, v in ids[0].items() if k not in ("adapter_name", "scale")}
            adapter_info.update(scale=scales[0], merged=bool(merge))
        else:
            adapter_info = {"adapters": ids, "paths": [one["path"] for one in ids], "scales": scales,
                            "merged": bool(merge)}
    cast_for_generation(model, dtype)
    model.to(device)
    model.eval()
    info_dtype = str(dtype).replace("torch.", "")
    log.info("Generating on %s, decoder dtype %s", device, info_dtype)
    return model, processor, info, adapter_info
