"""Training a LoRA adapter, the library behind train_lora.py: preparing the model for the step
(model_prep), the step loss and validation (step), the plan of steps, intervals and seeds (plan),
the run folder with its checkpoints (checkpoints), what a resume may change (resume), the
samples during training (samples), the run's processes (processes), and the run's log (run_log).

Imports: lora.common, lora.config, lora.modeling, lora.dataset, lora.dataprep, lora.generation,
lora.scoring.
"""
