"""The CPU train step in one process, variants alternating step by step (bench_attention.py,
bench_dropout.py).

A change to the step moves it by a few percent, less than this kind of VM's drift between two
processes; one process, one batch and the variants in turn (the order swapped every round) put the
drift on all of them alike.
"""

from __future__ import annotations

import time


def cpu_train_step(model_name: str, frames: int, text_tokens: int, padding: float = 0.25):
    """(step, model) for train_lora.py's step on a CPU: the model prepared exactly like
    train_lora.py (lora.training.model_prep.prepare_model, default config: bf16 autocast, bf16
    frozen weights, LoRA rank 12 on attention), one batch of 2 clips x ``frames`` codec frames with
    ``text_tokens`` caption states (the second caption ``padding`` shorter: a padding mask, as in a
    real batch of two captions); ``step()`` runs step_loss, backward, clipping and AdamW and returns
    its seconds. ``model_name``: small / medium / large (random weights with that architecture),
    tiny, or a model folder."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from musicgen_arch import model_path

    from lora.config import Config
    from lora.modeling.loading import load_base_model
    from lora.training import model_prep
    from lora.training import step as training_step

    cfg = Config()
    cfg.model.model_path = model_path(model_name)
    model, processor, info = load_base_model(cfg.model)
    torch.manual_seed(0)
    device = torch.device("cpu")
    model, params = model_prep.prepare_model(model, cfg, "bf16", device)
    model_prep.set_train_mode(model, cache_text=True)
    AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision="bf16", cpu=True)
    optimizer = acc.prepare(torch.optim.AdamW(params, lr=1e-4))
    B = 2
    g = torch.Generator().manual_seed(0)
    batch = {"codes": torch.randint(0, info.vocab_size, (B, info.num_codebooks, frames), generator=g),
             "lengths": torch.full((B,), frames),
             "hidden": torch.randn(B, text_tokens, info.text_hidden_size, generator=g),
             "mask": torch.ones(B, text_tokens, dtype=torch.long),
             "dropped": torch.zeros(B, dtype=torch.bool)}
    shorter = text_tokens - int(round(padding * text_tokens))
    batch["mask"][1, shorter:] = 0
    batch["hidden"][1, shorter:] = 0

    def step() -> float:
        t0 = time.perf_counter()
        loss = training_step.step_loss(model, processor, info, batch, device, acc.autocast, True).loss
        acc.backward(loss)
        acc.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step.info, step.second_caption_tokens = info, shorter
    return step, model


def alternate(step, variants: dict, rounds: int, warmup: int = 3) -> dict:
    """Seconds per step of each variant: ``variants`` maps a name to a function that switches the
    model to it; ``warmup`` steps first (not timed), then ``rounds`` rounds of one step per variant,
    the order swapped every round. The first variant is switched on again at the end."""
    names = list(variants)
    times = {name: [] for name in names}
    try:
        for _ in range(warmup):
            step()
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                variants[name]()
                times[name].append(step())
    finally:
        variants[names[0]]()
    return times
