"""Whether a saved LoRA adapter can be loaded onto a base model, checked before peft loads it: its
files and hand-editable adapter_config.json (peft_type, r, lora_alpha, target modules, the rank of
the saved weights), the base it records (another name of the same architecture loads with a
warning; another family, codebook count or shapes is refused, named), and peft's own refusals as
messages naming the folder. lora.modeling.adapter loads it after these checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Optional

from lora.common.cli import UserError, clip_text, log
from lora.modeling.loading import family_for


def same_base(recorded: str, used: str) -> bool:
    if recorded == used:
        return True
    pr, pu = Path(recorded).expanduser(), Path(used).expanduser()
    if pr.exists() and pu.exists():
        return os.path.realpath(pr) == os.path.realpath(pu)
    # A hub id and its snapshot in the HF cache (.../models--owner--name/snapshots/<commit>).
    for hub, path in ((recorded, used), (used, recorded)):
        if hub.count("/") == 1 and not Path(hub).exists():
            if f"models--{hub.replace('/', '--')}" in Path(path).as_posix():
                return True
    return False


def same_model_name(recorded: str, used: str) -> bool:
    """facebook/musicgen-small vs a folder named musicgen-small (hf download --local-dir)."""
    return Path(recorded.rstrip("/")).name.lower() == Path(used.rstrip("/")).name.lower()


def _adapter_shape_problems(base, adapter_file: Path) -> list[str]:
    """Compare the adapter's tensors with the model's layers (architecture check without loading):
    LoRA matrices of linear layers (lora_A / lora_B) and of embeddings (lora_embedding_A / _B), and
    whole layers the adapter replaces (peft's modules_to_save) against the parameter they
    replace."""
    from safetensors import safe_open

    modules = dict(base.named_modules())
    params = dict(base.named_parameters())
    problems = []
    with safe_open(str(adapter_file), framework="pt") as fh:
        for key in fh.keys():
            shape = tuple(fh.get_slice(key).get_shape())
            key = key.removeprefix("base_model.model.")
            lin = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
            emb = re.fullmatch(r"(.+)\.lora_embedding_(A|B)(?:\.[^.]+)?", key)
            if lin or emb:
                name = (lin or emb).group(1)
                mod = modules.get(name)
                if mod is None:
                    problems.append(f"layer {name} does not exist in this model")
                elif lin and hasattr(mod, "in_features"):
                    want = mod.in_features if lin.group(2) == "lora_A" else mod.out_features
                    have = shape[1] if lin.group(2) == "lora_A" else shape[0]
                    if want != have:
                        problems.append(f"{name}: adapter expects size {have}, model has {want}")
                elif emb and hasattr(mod, "num_embeddings"):
                    want = mod.num_embeddings if emb.group(2) == "A" else mod.embedding_dim
                    have = shape[1] if emb.group(2) == "A" else shape[0]
                    if want != have:
                        problems.append(f"{name}: adapter expects size {have}, model has {want}")
            elif key.rsplit(".", 1)[0] not in modules and key not in params:
                problems.append(f"layer {key.rsplit('.', 1)[0]} (saved whole: modules_to_save) "
                                f"does not exist in this model")
            elif key in params and tuple(params[key].shape) != shape:
                problems.append(f"{key} (saved whole: modules_to_save): adapter has shape "
                                f"{list(shape)}, model has {list(params[key].shape)}")
            if len(problems) >= 3:
                break
    return problems


def _recorded_config(recorded: str) -> Optional[dict]:
    """config.json of the adapter's recorded base, when it is on this machine (a folder or the HF
    cache)."""
    cfg_file = Path(recorded).expanduser() / "config.json"
    if not cfg_file.is_file() and recorded.count("/") == 1:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(recorded, "config.json")
            cfg_file = Path(cached) if isinstance(cached, str) else cfg_file
        except (ImportError, ValueError):
            pass
    if not cfg_file.is_file():
        return None
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_adapter_config(adapter_dir: Path) -> dict:
    if not adapter_dir.is_dir():
        raise UserError(f"LoRA adapter folder not found: {adapter_dir}. Train one with `python "
                        f"train_lora.py` (it writes output/best_model and output/final_model), or "
                        f"set lora_model_path to none to use the base model alone.")
    missing = [f for f in ("adapter_config.json", "adapter_model.safetensors")
               if not (adapter_dir / f).is_file()]
    if missing:
        raise UserError(f"{adapter_dir} is not a complete LoRA adapter: missing "
                        f"{', '.join(missing)}. Point lora_model_path at a folder written by "
                        f"train_lora.py (best_model, final_model or checkpoints/checkpoint-N).")
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{adapter_dir / 'adapter_config.json'} cannot be read ({e}).") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{adapter_dir / 'adapter_config.json'} is damaged (not a PEFT adapter "
                        f"config).")
    return cfg


def check_adapter_files(adapter_dir) -> dict:
    """The adapter folder is complete and its files are whole (adapter_config.json readable; the
    safetensors file's header readable and covering the whole file, which safetensors checks);
    returns adapter_config.json. UserError naming the damaged file: scripts call this before any
    model loads."""
    from safetensors import SafetensorError, safe_open

    adapter_dir = Path(adapter_dir).expanduser()
    cfg = _read_adapter_config(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as fh:
            ranks = {tuple(fh.get_slice(k).get_shape())[0] for k in fh.keys()
                     if re.search(r"\.lora_A(?:\.[^.]+)?\.weight$", k)}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights} is damaged ({str(e).splitlines()[0][:200]}): use another "
                        f"adapter (best_model, final_model or a checkpoint), or train again.") from None
    problems = adapter_config_problems(cfg, ranks)
    if problems:
        raise UserError(f"{adapter_dir / 'adapter_config.json'} is not a LoRA adapter config this "
                        f"toolkit can load: {'; '.join(problems)}. Was it edited by hand? Restore it "
                        f"(train_lora.py writes it next to the weights), or use another adapter.")
    return cfg


def adapter_config_problems(cfg: dict, ranks: set) -> list[str]:
    """What is wrong in an adapter_config.json for a LoRA adapter whose weights have ``ranks`` (the
    first dimension of its lora_A matrices): another peft type (IA3, LoHa, ... are refused: this
    toolkit applies LoRA), a rank that is not a whole number >= 1 or does not match the weights,
    a lora_alpha that is not a number, target_modules that name nothing."""
    out = []
    kind = cfg.get("peft_type")
    if str(kind).upper() != "LORA":
        out.append(f"peft_type is {clip_text(kind, 40)!r}, not 'LORA' (this toolkit applies LoRA "
                   f"adapters only)")
        return out
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        out.append(f"r (the rank) is {clip_text(r, 40)!r}; it must be a whole number >= 1")
    elif ranks and not cfg.get("rank_pattern") and ranks != {r}:
        out.append(f"r is {r} but the weights (adapter_model.safetensors) have rank "
                   f"{', '.join(map(str, sorted(ranks)))}")
    alpha = cfg.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        out.append(f"lora_alpha is {clip_text(alpha, 40)!r}; it must be a number")
    targets = cfg.get("target_modules")
    if not (isinstance(targets, str) and targets.strip()) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        out.append(f"target_modules is {clip_text(targets, 60)!r}; it must be a list of layer names "
                   f"or a pattern")
    return out


def _missing_targets(base, adapter_dir: Path, targets) -> Optional[str]:
    """The problem when adapter_config.json's target_modules match no layer of ``base`` (peft's rule:
    a list matches a layer by its name or the end of it, a string is a regex of the whole name)."""
    names = [n for n, _ in base.named_modules() if n]
    if isinstance(targets, str):
        try:
            rx = re.compile(targets)
        except re.error as e:
            return f"target_modules {clip_text(targets, 80)!r} is not a valid pattern ({e})"
        hit = any(rx.fullmatch(n) for n in names)
    else:
        hit = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
        missing = [t for t in targets if t not in hit]
        if missing and hit:
            return (f"target_modules names layers this model does not have: "
                    f"{clip_text(', '.join(missing), 200)}")
    if not hit:
        return f"target_modules {clip_text(targets, 120)!r} match no layer of this model"
    return None


@contextlib.contextmanager
def peft_errors(adapter_dir: Path):
    """peft's own refusal of a hand-edited adapter_config.json (a setting it does not know, a value
    of the wrong kind): a message naming the file (what check_adapter_files checks comes first)."""
    try:
        yield
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{Path(adapter_dir) / 'adapter_config.json'} cannot be loaded by peft "
                        f"({type(e).__name__}: {clip_text(str(e), 300)}). Was it edited by hand? "
                        f"Restore it, or use another adapter.") from None


def check_adapter_fits(base, adapter_dir: Path, recorded: str, used: str) -> None:
    """UserError unless the adapter's layers and the architecture of its recorded base fit the base
    model in use: another family, another codebook count or other layer shapes. A recorded base of
    another name whose architecture fits is used with a warning naming both."""
    fam = family_for(base)
    adapter_cfg = _read_adapter_config(adapter_dir)
    missing = _missing_targets(base, adapter_dir, adapter_cfg.get("target_modules") or [])
    if missing:
        raise UserError(f"{adapter_dir / 'adapter_config.json'}: {missing} (was it edited by hand?). "
                        f"Restore it, or use another adapter.")
    shape_problems = _adapter_shape_problems(base, adapter_dir / "adapter_model.safetensors")
    if shape_problems:
        shape = ", ".join(f"{k} {v}" for k, v in fam.decoder_shape(base.config).items())
        raise UserError(
            f"The LoRA adapter {adapter_dir / 'adapter_model.safetensors'} does not fit the base "
            f"model in use: it was trained on base model {recorded or '(not recorded)'} but the "
            f"base model in use is {used} ({shape}), and their layers differ "
            f"({'; '.join(shape_problems)}): another architecture or another number of codebooks. "
            f"Use --model_path {recorded or '<the base it was trained on>'}.")
    recorded_cfg = _recorded_config(recorded) if recorded else None
    kinds = (recorded_cfg or {}).get("model_type"), base.config.model_type
    if recorded_cfg is not None and kinds[0] != kinds[1]:
        raise UserError(
            f"The LoRA adapter {adapter_dir} was trained on {recorded}, a {kinds[0]!r} model, but "
            f"the base model in use is {used}, a {kinds[1]!r} model: an adapter of a melody model "
            f"does not apply to a text-only MusicGen, nor the reverse (their decoders read the "
            f"condition differently). Use --model_path {recorded}.")
    recorded_shape = fam.decoder_shape(recorded_cfg) if recorded_cfg is not None else None
    used_shape = fam.decoder_shape(base.config)
    if recorded_shape is not None and recorded_shape != used_shape:
        diff = ", ".join(f"{k} {recorded_shape[k]} vs {used_shape[k]}" for k in fam.DECODER_SHAPE_KEYS
                         if recorded_shape[k] != used_shape[k])
        raise UserError(
            f"The LoRA adapter {adapter_dir} was trained on base model {recorded}, but the base "
            f"model in use is {used}, a different architecture ({diff}). Use --model_path {recorded}.")
    if recorded and used and not same_base(recorded, used):
        if recorded_cfg is None:
            _check_named_base(base, adapter_dir, recorded, used)
        how = ("the same architecture (both config.json)" if recorded_cfg is not None else
               "its layers fit this model's; the recorded base is not on this machine, so its "
               "config.json was not compared")
        log.warning("The LoRA adapter %s was trained on base model %s; using it with %s: %s. A "
                    "local copy of that model in a folder of another name is fine; another "
                    "checkpoint of the same architecture gives other music.", adapter_dir,
                    recorded, used, how)
    elif not recorded:
        log.warning("%s does not record its base model; assuming %s", adapter_dir
                    / "adapter_config.json", used)


def _check_named_base(base, adapter_dir: Path, recorded: str, used: str) -> None:
    """An adapter whose recorded base (a hub id, say) is not on this machine: what its name says
    (Meta's checkpoints are named musicgen[-stereo][-melody]-<size>) must not contradict the model
    in use: a melody adapter on a text-only MusicGen (or the reverse), a stereo adapter on a mono
    one. The layer shapes were compared already."""
    name = Path(recorded.rstrip("/")).name.lower()
    if "musicgen" not in name:
        return
    melody, stereo = family_for(base).MELODY, int(base.config.decoder.audio_channels) == 2
    said = {"melody": "melody" in name, "stereo": "stereo" in name}
    if said["melody"] != melody or said["stereo"] != stereo:
        kind = lambda m, st: f"a {'stereo' if st else 'mono'} {'melody ' if m else ''}model"  # noqa: E731
        raise UserError(
            f"The LoRA adapter {adapter_dir} was trained on base model {recorded}, "
            f"{kind(said['melody'], said['stereo'])} by its name, but the base model in use is "
            f"{used}, {kind(melody, stereo)}: their decoders read another condition or another "
            f"number of codebooks. Use --model_path {recorded} (or a local copy of it).")
