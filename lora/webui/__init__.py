"""The web UI's engine (app.py keeps the gradio wiring): generation with one base model and adapters
switched onto it (engine), and the training and evaluation processes it starts and reads (runs).

Add a UI tab's logic here, and its widgets in lora/app.py.

Imports: lora.common, lora.config, lora.modeling, lora.dataset, lora.dataprep, lora.generation,
lora.scoring, lora.training.
"""
