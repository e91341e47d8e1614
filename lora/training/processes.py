"""The processes of a training run: accelerate's Accelerator (one process, or one of several under
``accelerate launch`` / ``torchrun``) with the run's precision and its log file, and how the token
cache build shares its work among the processes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lora.common.cli import log
from lora.config import Config
from lora.dataprep.token_cache import Ranks
from lora.modeling.cpu_speed import keep_freed_memory
from lora.modeling.precision import choose_precision, resolve_base_weights_dtype


def start_processes(cfg: Config):
    """The Accelerator (one process or one of several), the precision and, on the main process,
    logs/train.log."""
    import torch
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    t = cfg.training
    out = Path(t.output_dir)
    # Several processes without CUDA (torchrun on CPUs): accelerate needs cpu=True to use gloo.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    state0 = PartialState(cpu=cpu)
    precision, why = choose_precision(t.mixed_precision, state0.device)
    AcceleratorState._reset_state()  # main() may run several times in one process (tests)
    acc = Accelerator(mixed_precision=precision, cpu=cpu)
    if not acc.is_main_process:
        log.setLevel("WARNING")
    else:  # logs/train.log: the same lines as the console (main() removes the handler again)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        file_log = logging.FileHandler(out / "logs" / "train.log", encoding="utf-8")
        file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file_log)
    log.info("Precision: %s (%s)", precision, why)
    if acc.device.type == "cpu" and keep_freed_memory():
        log.info("CPU memory: freed tensors stay in the process for reuse (glibc malloc; fewer "
                 "page faults)")
    # what accelerate config / accelerate launch set
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched and launched != precision:
        log.warning("accelerate's mixed_precision setting (%s) is not used: "
                    "training.mixed_precision decides (--mixed_precision / --fp16 / --bf16; now "
                    "%s)", launched, precision)
    # a bad combination fails before the model loads
    resolve_base_weights_dtype(t.base_weights_dtype, precision)
    return acc, precision


def cache_ranks(acc) -> Ranks:
    """The processes of this run, as the token cache build shares its work among them."""
    from accelerate.utils import broadcast_object_list, gather_object

    def broadcast(obj):
        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    return Ranks(rank=acc.process_index, world=acc.num_processes, broadcast=broadcast,
                 gather=lambda obj: gather_object([obj]))
