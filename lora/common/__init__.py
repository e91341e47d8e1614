"""What every stage and script shares, and nothing about music: the ``lora`` logger and user errors
with the ``run_main`` wrapper (cli), atomic writes, locks and free-space checks (files), and how a
setting of the schema is declared, typed and read from YAML or a flag (fields; the schema itself is
lora/config.py).

Imports: nothing of lora.
"""
