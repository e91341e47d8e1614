"""The padded length of a caption's text states: a length that depends on the caption alone.

Generation zero-pads (mask 0) each prompt's text states to ``text_length`` of its own tokens and
batches only prompts of the same padded length, so a sample's decoder input does not depend on the
other prompts of its batch (lora.generation.engine). For MusicGen the padded positions are masked
out of the cross-attention, and only bf16 rounding sees the length. For MusicGen-Melody the text is
part of a prefix the decoder attends to whole: the padded length is part of the condition, so
training, validation and the evaluation give every clip the length generation gives its caption
(lora.modeling.musicgen_melody.teacher_forced_logits), whichever clips share its batch.
"""

from __future__ import annotations

import math

# Captions of up to 32 tokens (most MusicGen prompts) share one padded length, and so can share a
# batch; a longer multiple costs cross-attention time (BENCHMARKS.md, "Generation": 64 was ~20%
# slower at batch 8).
TEXT_PAD_MULTIPLE = 32


def text_length(n_tokens: int) -> int:
    """The length L that the text states of a caption of ``n_tokens`` tokens are padded to: the
    next multiple of ``TEXT_PAD_MULTIPLE`` (at least one multiple: an empty caption too). The
    decoder cross-attends over (or, for a melody model, reads) L positions, and in bf16 the rounding
    of that attention depends on L (not only on the prompt's own tokens), so L must not depend on
    the other prompts of a batch."""
    return max(1, math.ceil(int(n_tokens) / TEXT_PAD_MULTIPLE)) * TEXT_PAD_MULTIPLE
