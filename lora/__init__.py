"""MusicGen LoRA toolkit: prepare audio, fine-tune MusicGen with LoRA, generate, evaluate.

What the user runs lies at the top of lora/ (each also as ``python lora/<script>.py`` or from inside
lora/): prepare_data, train_lora, inference_lora, evaluate, export_model and app (the tasks),
test_dataset and test_model (the diagnostics), beside the two modules the user's plan names: config
(the one schema) and dataset (metadata, the cached-token Dataset and its collate: what training
reads). A script is thin: parse, validate, call the library, report; it never imports another
script.

The library is one package per pipeline stage, each importing only the ones before it:

    common      errors, logging, the main() wrapper, atomic files, settings machinery
    modeling    model families, loading, tiny models, fast decoders, EnCodec encoder, adapters, precision
    dataprep    audio I/O, captions, example data, data check, the prepare run, the token cache
    generation  the one generation engine, requests, prompts, manifests
    scoring     metrics, held-out likelihood, generated-audio measurements, plots, the report
    training    model preparation, the step, the plan, the run folder and checkpoints, the run log
    webui       the web UI's engine and process manager

Each package's ``__init__`` says what it owns and what it may import (tests/test_layout.py holds the
code to it); docs/ARCHITECTURE.md draws the stages and the path of one training run through them.
"""

__version__ = "0.1.0"
