"""MusicGen LoRA toolkit: prepare audio, fine-tune MusicGen with LoRA, generate, evaluate.

Scripts (each also runs as ``python lora/<script>.py`` or from inside ``lora/``): prepare_data, train_lora,
inference_lora, evaluate (the tasks); test_dataset, test_model (diagnostics). A script never imports another.

Modules: config (the one schema), musicgen (the model family: the only module that knows MusicGen's internals;
fast_decode is its decoding step), loading (hub / folder / tiny model -> the family of its model_type), tiny_model,
adapter (LoRA), training (train_lora's library), generation, precision, cpu_speed, dataset (metadata and the token
cache), audio, captions / example_data / data_check (shared by prepare_data and test_dataset), prompts, metrics,
report, utils. README.md's Layout section says which file to open for what.
"""

__version__ = "0.1.0"
