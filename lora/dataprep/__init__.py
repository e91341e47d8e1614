"""Turning the user's audio into training data, and reading it back: audio I/O in any format
(audio), captions (captions), the synthetic example set (example_data), the data check (data_check),
the prepare run with its scan, per-file worker and output-folder ownership (prepare, scan, worker,
ownership), and the token cache of EnCodec codes and text states that training reads (token_cache:
what to encode and each process's share; cache_store: its files, their join and the cache index).

Add an audio format or a caption source here.

Imports: lora.common, lora.config, lora.modeling, lora.dataset.
"""
