"""The model: MusicGen's families (musicgen, musicgen_melody: the only modules that know MusicGen's
internals; the rest reach them through ``loading.family_for``), loading a hub id / local folder /
built-in tiny model (loading, tiny_model), the fast decoding step (fast_decode) and EnCodec encoder
(encodec_fast), the melody's chroma (chroma), CLAP (clap), LoRA adapters (adapter, and the checks
that one fits a base: adapter_checks), mixed precision (precision) and the CPU speed-ups of the
train step (cpu_speed).

Add a model family or a LoRA target here.

Imports: lora.common, lora.config.
"""
