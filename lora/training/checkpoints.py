"""The run folder: what train_lora.py writes there (and may therefore delete again), the lock
against two runs in one folder, resumable checkpoints (``save_checkpoint`` / ``find_checkpoint`` /
``load_checkpoint``), the adapter folders and their model card; ``TrainState`` is what they record
(``trainer_state.json``, written last).
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lora.common.cli import UserError, log
from lora.common.files import atomic_dir, atomic_write_json, atomic_write_text, folder_lock, save_torch
from lora.common.ownership import claim_output, remove_entries
from lora.config import Config

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lora.modeling.musicgen import ModelInfo

STATE_FILE = "trainer_state.json"


# ============================================================================================
# State and checkpoints
# ============================================================================================
@dataclass
class TrainState:
    """Where a run is: saved in trainer_state.json of every checkpoint and adapter, restored on
    resume."""

    global_step: int = 0
    epoch: float = 0.0
    data_epoch: int = 0          # the epoch whose batches are being read
    step_in_epoch: int = 0       # optimizer steps done in data_epoch
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    base_val_loss: Optional[float] = None
    nan_steps_total: int = 0
    nan_in_a_row: int = 0
    evals_without_improvement: int = 0
    log_history: list = field(default_factory=list)

    def restore(self, saved: dict) -> None:
        for k in asdict(self):
            if k in saved:
                setattr(self, k, saved[k])

    def snapshot(self, stage: str, **run) -> dict:
        """The trainer_state.json document: the state, the stage that wrote it and facts about the
        run."""
        return dict(asdict(self), stage=stage, **run)


# What train_lora.py writes into output_dir, and may therefore delete again
# (--overwrite_output_dir): its run folders, each holding only these files, with its
# trainer_state.json. Anything else there is the user's.
RUN_FOLDERS = ("checkpoints", "best_model", "final_model", "samples")
ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "README.md",
                           "config.yaml", STATE_FILE, "eval_results.json"})
CHECKPOINT_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "README.md",
                              "config.yaml",
                              STATE_FILE, "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pt"})
CHECKPOINT_NAME = re.compile(r"step-\d{6}")
SAMPLE_FILE = re.compile(r"sample_\d{2,}\.wav|manifest\.json")  # samples/step-NNNNNN/
# lora.common.files.atomic_dir's temporary folders after a crash
ATOMIC_LEFTOVER = re.compile(r"\..+\.(?:tmp|old)")
LOCK_FILE = ".train_lora.lock"


def read_state(folder: Path) -> Optional[dict]:
    """trainer_state.json of a folder when it is one this tool wrote (an object with an integer
    global_step), else None."""
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(state, dict) and isinstance(state.get("global_step"), int)
    return state if ok else None


def _foreign_entries(folder: Path, allowed: frozenset, need_state: bool) -> list[Path]:
    """Entries of one of our run folders that this tool does not write there (all of them when the
    folder is not recognisably ours: no valid trainer_state.json)."""
    entries = sorted(folder.iterdir())
    if need_state and read_state(folder) is None:
        return entries  # (an empty folder holds nothing to lose)
    return [e for e in entries if e.name not in allowed or not e.is_file() or e.is_symlink()]


LOG_FILES = re.compile(r"metrics\.jsonl|train\.log|loss_curve\.png|timing\.json|events\.out\.tfevents\..+"
                       r"|\.(?:metrics\.jsonl|loss_curve\.png|timing\.json)\..+\.tmp")
CONFIG_HEADER = "# Resolved configuration"


def _foreign_in_run_folder(p: Path) -> list[Path]:
    """What in one of train_lora.py's run folders (checkpoints/, samples/, best_model/, final_model/) it did
    not write ([] = all of it is the tool's; [p] = the folder itself is not one of its own)."""
    if p.is_symlink() or not p.is_dir():
        return [p]
    if p.name not in ("checkpoints", "samples"):
        return _foreign_entries(p, ADAPTER_FILES, need_state=True)
    foreign = []
    for c in sorted(p.iterdir()):
        if p.name == "samples" and c.is_dir() and not c.is_symlink() and (
                CHECKPOINT_NAME.fullmatch(c.name) or ATOMIC_LEFTOVER.fullmatch(c.name)):
            # the training samples of one step (lora.training.samples), or an interrupted write
            foreign += [e for e in sorted(c.iterdir()) if not e.is_file() or e.is_symlink()
                        or not SAMPLE_FILE.fullmatch(e.name)]
        elif c.is_dir() and not c.is_symlink() and CHECKPOINT_NAME.fullmatch(c.name):
            foreign += _foreign_entries(c, CHECKPOINT_FILES, need_state=True)
        elif c.is_dir() and not c.is_symlink() and ATOMIC_LEFTOVER.fullmatch(c.name):
            # an interrupted save
            foreign += _foreign_entries(c, CHECKPOINT_FILES, need_state=False)
        else:
            foreign.append(c)
    return foreign


def _foreign_in_output(p: Path) -> list[Path]:
    """logs/ and config.yaml of output_dir: what train_lora.py did not write there."""
    if p.is_symlink():
        return [p]
    if p.name == "logs":
        if not p.is_dir():
            return [p]
        return [e for e in sorted(p.iterdir()) if e.is_symlink() or not e.is_file()
                or not LOG_FILES.fullmatch(e.name)]
    try:
        with open(p, encoding="utf-8") as fh:
            head = fh.read(len(CONFIG_HEADER))
    except (OSError, UnicodeDecodeError):
        head = ""
    return [] if p.is_file() and head == CONFIG_HEADER else [p]


def earlier_run(out: Path) -> tuple[list[Path], list[Path]]:
    """(the run folders an earlier run of train_lora.py left in ``out``, the entries among them it
    did not write)."""
    ours, foreign = [], []
    for name in RUN_FOLDERS:
        p = out / name
        if p.exists() or p.is_symlink():
            alien = _foreign_in_run_folder(p)
            foreign += alien
            if alien != [p]:
                ours.append(p)
    return ours, foreign


def clear_earlier_run(out: Path, overwrite: bool, is_main: bool = True, models=()) -> None:
    """A fresh run must not mix with an earlier run's files: its checkpoints would be taken for this
    run's by --resume_from_checkpoint latest, and its best_model would look like this run's if this
    one stops early. The ownership rule of every script (lora.common.ownership): anything
    train_lora.py did not write where it writes (its run folders, logs/, config.yaml) stops the run,
    and nothing is deleted; --overwrite_output_dir deletes the earlier run's folders, only what
    train_lora.py wrote; output_dir is never the base model's folder (``models``). A run killed
    before its first checkpoint and before any step starts again without the flag."""
    ours = claim_output(out, "train_lora.py", writes=RUN_FOLDERS, ours=_foreign_in_run_folder,
                        overwrite=None, models=models, overwrite_flag="--overwrite_output_dir")
    claim_output(out, "train_lora.py", writes=("logs", "config.yaml"), ours=_foreign_in_output,
                 overwrite=None, models=models, overwrite_flag="--overwrite_output_dir")
    if not ours:
        return
    newest = newest_checkpoint(out)
    trained = _trained_step(ours)
    if not overwrite and newest is None and trained == 0:
        # killed before its first checkpoint and before any step: nothing of it can be lost
        if is_main:
            log.warning("%s holds an earlier run that stopped before it trained (no checkpoint; "
                        "adapters from step 0 only): starting it again", out)
            remove_entries(ours)
        return
    if not overwrite:
        raise UserError(earlier_run_message(out, ours, newest, trained))
    if is_main:
        for p in ours:
            log.warning("--overwrite_output_dir: deleting %s of an earlier run", p)
        remove_entries(ours)


def _trained_step(ours: list[Path]) -> int:
    """The furthest step any adapter or checkpoint of an earlier run records (0: it never trained)."""
    states = [read_state(p) for p in ours if p.name != "checkpoints"]
    states += [read_state(c) for p in ours if p.name == "checkpoints" for c in p.glob("step-*")]
    return max([s["global_step"] for s in states if s] or [0])


def earlier_run_message(out: Path, ours: list[Path], newest: Optional[Path], trained: int) -> str:
    """Why a fresh run will not start in ``out``, and each way on that works from there."""
    names = ", ".join(p.name + "/" for p in ours)
    new = "choose another --output_dir for a new run"
    wipe = (f"pass --overwrite_output_dir to delete {names} and start over (copy what you want to "
            f"keep elsewhere first)")
    if newest is None:
        return (f"{out} holds an earlier training run ({names}, trained to step {trained}) that has no "
                f"checkpoint to resume from. To train here: {new}, or {wipe}.")
    state = read_state(newest) or {}
    return (f"{out} already holds an earlier training run ({names}; its newest checkpoint is at step "
            f"{state.get('global_step')} of {state.get('total_steps')}). To train here: {new}; or "
            f"continue that run with --resume_from_checkpoint latest (with its data, model and LoRA "
            f"settings: a difference is refused, named); or {wipe}.")


@contextlib.contextmanager
def output_lock(out: Path, enabled: bool = True):
    """Hold output_dir for this run: a second train_lora.py on the same folder stops at once, naming
    the running process (lora.common.files.folder_lock on output_dir/.train_lora.lock)."""
    if not enabled:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, LOCK_FILE, shared=False,
                     busy=f"{out} is in use by another training run. Wait for it to finish (or stop "
                          f"it), or choose another --output_dir"):
        yield


@dataclass
class Checkpoint:
    """A checkpoint read whole into memory (before anything is changed), ready to be applied to a
    run."""

    path: Path
    state: dict
    adapter: dict
    optimizer: dict
    scheduler: dict
    scaler: Optional[dict]
    rng: dict


def read_checkpoint(path: Path) -> Checkpoint:
    """Every file of a checkpoint, loaded (safetensors, torch.load weights_only); UserError naming
    the damaged file."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = read_state(path)
    if state is None:
        raise UserError(f"{path / STATE_FILE} is missing or damaged (not a trainer state written "
                        f"by train_lora.py)")

    def load(name, fn):
        try:
            return fn(path / name)
        except (OSError, RuntimeError, EOFError, ValueError, SafetensorError,
                pickle.UnpicklingError) as e:
            why = (str(e).splitlines() or [""])[0][:200]
            raise UserError(f"{path / name} is damaged "
                            f"({type(e).__name__}{': ' + why if why else ''})") from None

    pt = lambda f: torch.load(f, map_location="cpu", weights_only=True)  # noqa: E731
    return Checkpoint(path=path, state=state,
                      adapter=load("adapter_model.safetensors", lambda f: load_file(str(f))),
                      optimizer=load("optimizer.pt", pt), scheduler=load("scheduler.pt", pt),
                      scaler=load("scaler.pt", pt) if (path / "scaler.pt").is_file() else None,
                      rng=load("rng_state.pt", pt))


def find_checkpoint(output_dir: Path, spec: str) -> Checkpoint:
    """The checkpoint to resume, read whole: 'latest' -> the newest complete checkpoint that loads
    (falling back to an older one, with a warning, when the newest is damaged); else the given
    folder (UserError when damaged)."""
    if spec.strip().lower() != "latest":
        path = Path(spec).expanduser().resolve()
        if not (path / STATE_FILE).is_file():
            raise UserError(f"--resume_from_checkpoint {spec}: {path} is not a complete checkpoint "
                            f"(no {STATE_FILE}). Use 'latest' or a folder like "
                            f"{output_dir / 'checkpoints' / 'step-000200'}.")
        try:
            return read_checkpoint(path)
        except UserError as e:
            raise UserError(f"--resume_from_checkpoint {spec}: {e}. Resume from another checkpoint "
                            f"(e.g. 'latest', which skips damaged ones).") from None
    root = output_dir / "checkpoints"
    found = []
    for d in sorted(root.glob("step-*")) if root.is_dir() else []:
        state = read_state(d)
        if state is None:
            log.warning("Ignoring incomplete checkpoint %s (no readable %s)", d, STATE_FILE)
        else:
            found.append((state["global_step"], d))
    for _, d in sorted(found, reverse=True):
        try:
            ck = read_checkpoint(d)
        except UserError as e:
            log.warning("Checkpoint %s cannot be used: %s; trying the one before it", d, e)
            continue
        if d != max(found)[1]:
            log.warning("Resuming from %s, the newest checkpoint that loads whole", d)
        return ck
    raise UserError(f"--resume_from_checkpoint latest: no complete checkpoint in {root}"
                    + (" that loads (every one is damaged, see the warnings above)" if found else "")
                    + ". Run the same command without --resume_from_checkpoint: a run that stopped "
                      "before it trained starts again; one that trained, but saved no checkpoint, "
                      "needs --overwrite_output_dir too (it deletes that run's folders). Or pass a "
                      "checkpoint folder.")


def newest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step, or None."""
    found = [(st["global_step"], d) for d in sorted((output_dir / "checkpoints").glob("step-*"))
             if (st := read_state(d)) is not None]
    return max(found)[1] if found else None


def disk_space_needed(params, save_total_limit: int) -> int:
    """Bytes a run writes into output_dir, roughly: per checkpoint the adapter and AdamW's two
    moments (float32), save_total_limit + 1 of them while the oldest is rotated out, two adapters
    (best, final) and a few MB of logs."""
    adapter = 4 * sum(p.numel() for p in params)
    return int(1.2 * ((save_total_limit + 1) * 3 * adapter + 2 * adapter) + 20 * 2 ** 20)


def save_checkpoint(root: Path, model: nn.Module, optimizer, scheduler, scaler, cfg: Config,
                    snapshot: dict, keep: int) -> Path:
    """A resumable checkpoint root/step-NNNNNN (adapter, optimizer, scheduler, scaler, RNG, config,
    state written last: it marks the folder complete); only the newest ``keep`` checkpoints are
    kept."""
    import torch

    path = root / f"step-{snapshot['global_step']:06d}"
    with atomic_dir(path) as tmp:
        model.save_pretrained(str(tmp))
        # (a full disk: an OSError naming the file, not torch's "unexpected pos")
        save_torch(optimizer.state_dict(), tmp / "optimizer.pt", path / "optimizer.pt")
        save_torch(scheduler.state_dict(), tmp / "scheduler.pt", path / "scheduler.pt")
        if scaler is not None:
            save_torch(scaler.state_dict(), tmp / "scaler.pt", path / "scaler.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        save_torch(rng, tmp / "rng_state.pt", path / "rng_state.pt")
        cfg.save(tmp / "config.yaml")
        atomic_write_json(tmp / STATE_FILE, snapshot)  # written last: marks it complete
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("Saved checkpoint %s", path)
    return path


def load_checkpoint(ck: Checkpoint, model: nn.Module, optimizer, scheduler, scaler,
                    device: torch.device, state: TrainState, now: dict) -> None:
    """Apply a checkpoint (read by find_checkpoint) to the run: LoRA weights, optimizer, schedule,
    scaler, RNG and the state. ``now`` holds this run's batch_size / gradient_accumulation_steps /
    world_size / seed: a difference is warned about (the data order then differs from an
    uninterrupted run)."""
    import torch
    from peft import set_peft_model_state_dict

    for key, value in now.items():
        if ck.state.get("run", {}).get(key) not in (None, value):
            log.warning("Resuming with %s=%s but the checkpoint used %s: the data order will "
                        "differ from an uninterrupted run.", key, value, ck.state["run"][key])
    set_peft_model_state_dict(model, {k: v.to(device) for k, v in ck.adapter.items()})
    optimizer.load_state_dict(ck.optimizer)
    scheduler.load_state_dict(ck.scheduler)
    if scaler is not None and ck.scaler is not None:
        scaler.load_state_dict(ck.scaler)
    torch.set_rng_state(ck.rng["cpu"])
    if torch.cuda.is_available() and "cuda" in ck.rng:
        torch.cuda.set_rng_state_all(ck.rng["cuda"])
    state.restore(ck.state)
    log.info("Resumed from %s at step %d (epoch %d, batch %d of the epoch)", ck.path, state.global_step,
             state.data_epoch, state.step_in_epoch)


def save_adapter(path: Path, model: nn.Module, cfg: Config, snapshot: dict, evaluation: Optional[dict],
                 card: str) -> None:
    """best_model / final_model: the PEFT adapter, the config, trainer_state.json, eval_results.json
    and a model card README.md, written as one folder (atomically)."""
    snapshot = dict(snapshot, eval=evaluation)
    with atomic_dir(path) as tmp:
        model.save_pretrained(str(tmp))
        cfg.save(tmp / "config.yaml")
        atomic_write_json(tmp / STATE_FILE, snapshot)
        atomic_write_json(tmp / "eval_results.json", {"step": snapshot["global_step"],
                                                      "base_val_loss": snapshot["base_val_loss"],
                                                      **(evaluation or {})})
        atomic_write_text(tmp / "README.md", card)


def model_card(cfg: Config, info: ModelInfo, state: dict, kind: str, n_train: int, train_hours: float,
               where: Path) -> str:
    base = info.name_or_path
    best, base_loss = state.get("best_metric"), state.get("base_val_loss")
    lines = [
        f"# MusicGen LoRA adapter ({kind})", "",
        f"- Base model: `{base}`",
        f"- Data: {n_train} training clips ({train_hours:.2f} h) from `{cfg.data.data_dir}`",
        f"- Training: {state['global_step']} optimizer steps (epoch {state['epoch']:.2f}), LoRA rank "
        f"{cfg.lora.lora_rank}, alpha {cfg.lora.lora_alpha}, targets `{cfg.lora.lora_targets}`, "
        f"lr {cfg.training.learning_rate}, effective batch {state['effective_batch']}, precision "
        f"{state['precision']}",
    ]
    if base_loss is not None:
        lines.append(f"- Held-out loss (cross-entropy, mean over codebooks): base model "
                     f"{base_loss:.4f}, best {best:.4f} at step {state.get('best_step')}"
                     + (f", this adapter {state['eval']['val_loss']:.4f}" if state.get("eval") else ""))
    lines += [
        "", "## Use", "", "```bash",
        f"python lora/inference_lora.py --base_model_path {base} --lora_model_path {where} "
        f"--prompts \"your prompt\"", "```", "", "```python",
        "from transformers import AutoProcessor, MusicgenForConditionalGeneration",
        "from peft import PeftModel", "",
        f"base = MusicgenForConditionalGeneration.from_pretrained({base!r})",
        f"model = PeftModel.from_pretrained(base, {str(where)!r})",
        f"processor = AutoProcessor.from_pretrained({base!r})",
        "inputs = processor(text=['your prompt'], padding=True, return_tensors='pt')",
        "audio = model.generate(**inputs, do_sample=True, guidance_scale=3.0, max_new_tokens=500)",
        "```", "",
        "`config.yaml` holds the full configuration of the run; `eval_results.json` the held-out "
        "metrics.", ""]
    return "\n".join(lines)
