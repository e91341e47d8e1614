"""Sizes a user controls that no single setting's range covers, bounded before anything is allocated
(each setting's own range is declared with its field in lora/config.py, ``le=...``), and the one rule
for seeds: every script and the web UI check with these.
"""

from __future__ import annotations

from typing import Optional

from lora.common.cli import clip_text

MAX_SEED = 2 ** 32 - 1        # every seed (training, split, generation, per prompt, the UI): numpy's
                              # and CUDA's generators take 32 bits
MAX_TEXT_CHARS = 2000         # a caption or a prompt: T5 reads at most 512 tokens (~4 characters each)
MAX_TEXT_TOKENS = 512         # T5's limit: the text encoder cuts a longer text there, with a warning
MAX_PROMPTS = 10_000          # prompts in one run (a prompts file, --prompts, the UI)
MAX_FILES = 100_000           # files one generation writes (prompts x num_samples)
MAX_EVENTS = 1_000_000        # validations, checkpoints or log lines one training run plans


def seed_problem(seed, count: int, label: str = "seed") -> Optional[str]:
    """The one rule for seeds (every script and the UI): each seed used, ``seed`` .. ``seed + count
    - 1``, is a whole number from 0 to MAX_SEED; None when they all are."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        return f"{label} must be a whole number from 0 to {MAX_SEED} (got {clip_text(seed, 40)})"
    if seed < 0 or seed + max(1, int(count)) - 1 > MAX_SEED:
        last = f" (the last of its {count} samples would use {seed + count - 1})" if count > 1 else ""
        return (f"{label} must be a whole number from 0 to {MAX_SEED} (2^32-1), got "
                f"{clip_text(str(seed), 40)}{last}")
    return None


def text_problem(text: str, where: str) -> Optional[str]:
    """A caption or prompt longer than MAX_TEXT_CHARS (T5 reads at most MAX_TEXT_TOKENS tokens): the
    problem, naming ``where``; None when it fits."""
    if isinstance(text, str) and len(text) > MAX_TEXT_CHARS:
        return (f"{where}: the text is {len(text):,} characters long, more than {MAX_TEXT_CHARS:,} "
                f"(the text encoder reads at most {MAX_TEXT_TOKENS} tokens): "
                f"{clip_text(text, 60)!r}. Shorten it.")
    return None
