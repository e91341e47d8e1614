"""Measuring a fine-tune: pure metric functions on arrays (metrics), the held-out likelihood
(likelihood), the generated-audio measurements (generated) and their LoRA - base differences
(differences), the bootstrap intervals (intervals), the tests behind the summary's verdicts
(verdicts) and the simulation that checks them (null_simulation), charts (plots) and the report
(report: summary table, results.json's helpers, report.html).

Add a metric here.

Imports: lora.common, lora.config, lora.modeling, lora.dataset, lora.dataprep, lora.generation.
"""
