"""MusicGen LoRA toolkit: prepare audio, fine-tune MusicGen with LoRA, generate, evaluate.

Scripts (each also runs as ``python lora/<script>.py`` or from inside ``lora/``):
prepare_data, train_lora, inference_lora, evaluate, test_dataset, test_model.
"""

__version__ = "0.1.0"
