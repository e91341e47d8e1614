"""The web UI's engine (app.py keeps most of the gradio wiring): generation with one base model and
adapters switched onto it (engine), the training and evaluation processes it starts and reads
(runs), and the Data tab (data: preparing a folder of songs and reviewing its captions).

Add a UI tab's logic here, and its widgets in lora/app.py (or beside its logic, taking gradio as a
parameter, as data.build_tab does).

Imports: lora.common, lora.config, lora.modeling, lora.dataset, lora.dataprep, lora.generation,
lora.scoring, lora.training.
"""
