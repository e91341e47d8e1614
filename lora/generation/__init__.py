"""Making music: the one generation engine behind inference_lora.py, the evaluation and the web UI
(engine: the decoding loop, guidance, windows past 30 s, melody), what it is asked and returns
(requests), the model it runs on with its adapters (model), prompt files (prompts), and what a
generation writes (manifest).

Imports: lora.common, lora.config, lora.modeling, lora.dataprep.
"""
