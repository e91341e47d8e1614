"""LoRA adapters: which layers get one (presets, suffixes, regexes), attach, load (with the checks
that it fits the base), scale, merge, and an adapter's identity.

Adapters are plain PEFT: ``attach_lora`` wraps the base model with ``peft.get_peft_model``; a saved
adapter (``adapter_config.json`` + ``adapter_model.safetensors``) loads with
``PeftModel.from_pretrained`` anywhere. Where LoRA may go is the model family's knowledge
(``LORA_PRESETS``, ``LORA_SEARCH_PREFIX``, ``TEXT_ENCODER_TARGETS``, ``decoder_shape`` of
lora.modeling.musicgen); this module applies it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lora.common.cli import UserError, log
from lora.config import range_problems, validate
from lora.modeling.adapter_checks import (  # noqa: F401  (check_adapter_files etc. are used from here)
    adapter_config_problems,
    check_adapter_files,
    check_adapter_fits,
    peft_errors,
    same_base,
    same_model_name,
)
from lora.modeling.loading import family_for
from lora.modeling.musicgen import get_base

if TYPE_CHECKING:
    from torch import nn

_REGEX_CHARS = set("^$*+?[](){}|\\")


def _lora_capable(module) -> bool:
    import torch.nn as nn

    return isinstance(module, (nn.Linear, nn.Embedding))


def lora_target_names(model: nn.Module, targets: str, train_text_encoder: bool = False) -> list[str]:
    """Full module names that get LoRA for a ``lora_targets`` setting (a preset, suffixes or a
    regex).

    Only the family's decoder is searched (plus the text encoder's self-attention when
    ``train_text_encoder``); the audio codec and the rest of the text encoder never get LoRA. A
    pattern that matches nothing is a UserError listing some module names.
    """
    base = get_base(model)
    fam = family_for(base)
    modules = {name: mod for name, mod in base.named_modules() if name}
    decoder_names = [n for n in modules if n.startswith(fam.LORA_SEARCH_PREFIX)
                     and _lora_capable(modules[n])]
    spec = (targets or "").strip()
    if not spec:
        raise UserError("lora_targets is empty; use 'attention', 'attention_ffn', a "
                        "comma-separated list of module name suffixes (e.g. q_proj,v_proj) or a regex.")
    if spec in fam.LORA_PRESETS:
        rx = re.compile(fam.LORA_PRESETS[spec])
        matched = [n for n in decoder_names if rx.fullmatch(n)]
    elif any(ch in _REGEX_CHARS for ch in spec):
        try:
            rx = re.compile(spec)
        except re.error as e:
            raise UserError(f"lora_targets {spec!r} is not a valid regular expression ({e}).") from None
        matched = [n for n in decoder_names if rx.search(n)]
    else:
        suffixes = [s.strip() for s in spec.split(",") if s.strip()]
        matched = [n for n in decoder_names if any(n == s or n.endswith("." + s) for s in suffixes)]
    if not matched:
        examples = [n for n in decoder_names if fam.LORA_EXAMPLE_LAYER in n][:12] or decoder_names[:12]
        raise UserError(
            f"lora_targets {spec!r} matches no layer of the {fam.DECODER_NAME}. Use "
            f"{fam.LORA_PRESETS_HELP}, a comma-separated list of name suffixes or a regex. Some "
            f"decoder layer names: {', '.join(examples)}")
    if train_text_encoder:
        rx = re.compile(fam.TEXT_ENCODER_TARGETS)
        text = [n for n, m in modules.items() if rx.fullmatch(n) and _lora_capable(m)]
        if not text:
            raise UserError("train_text_encoder: no T5 self-attention layers (q/k/v/o) found in "
                            "the text encoder.")
        matched += text
    return sorted(set(matched), key=list(modules).index)


@contextlib.contextmanager
def _quiet_peft_wrap():
    """peft asks the model ``is_gradient_checkpointing`` when it wraps it, and transformers 5
    answers with a FutureWarning (a deprecated name, in their code, not ours) at every LoRA attach:
    silenced for that call only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        yield


def attach_lora(model: nn.Module, lora_cfg):
    """Wrap the base model in a peft LoRA PeftModel following ``lora_cfg`` (a LoraSection).

    The adapter config records the real base (``model.name_or_path``: folder or hub id) as
    base_model_name_or_path, so
    ``PeftModel.from_pretrained(MusicgenForConditionalGeneration.from_pretrained(base),
    adapter_dir)`` loads the saved adapter.
    """
    from peft import LoraConfig, get_peft_model

    # (parse_config has checked them; a LoraSection made in code too)
    validate(range_problems(lora_cfg, ["lora"]))
    base = get_base(model)
    names = lora_target_names(base, lora_cfg.lora_targets, bool(lora_cfg.train_text_encoder))
    base_name = getattr(base, "name_or_path", None) or base.config._name_or_path or None
    config = LoraConfig(
        r=int(lora_cfg.lora_rank), lora_alpha=float(lora_cfg.lora_alpha),
        lora_dropout=float(lora_cfg.lora_dropout),
        target_modules=names, bias="none", use_dora=bool(lora_cfg.use_dora),
        use_rslora=bool(lora_cfg.use_rslora), base_model_name_or_path=base_name)
    with _quiet_peft_wrap():
        peft_model = get_peft_model(base, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    trainable, total = peft_model.get_nb_trainable_parameters()
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    log.info("LoRA (r=%d, alpha=%g%s%s) on %d modules (%s); trainable parameters %s of %s (%.3f%%)",
             config.r, config.lora_alpha, ", DoRA" if config.use_dora else "", ", rsLoRA"
             if config.use_rslora else "",
             len(names), shown, f"{trainable:,}", f"{total:,}", 100.0 * trainable / max(total, 1))
    return peft_model


# --------------------------------------------------------------------------------------------
# Loading a saved adapter, with the checks that it fits the base model
# --------------------------------------------------------------------------------------------
def load_lora(model: nn.Module, adapter_dir, is_trainable: bool = False,
              expected_base: Optional[str] = None):
    """Load a saved PEFT LoRA adapter onto the base model; returns the PeftModel.

    Checks first (each failure is a UserError naming the file or both models): the folder holds
    adapter_config.json and adapter_model.safetensors; the adapter's layer sizes fit this model; its
    recorded base (base_model_name_or_path) is of the same family and decoder architecture as the
    model in use (``expected_base``, default ``model.name_or_path``), compared by config.json where
    the recorded base is on this machine, else by what its name says (melody, stereo). A recorded
    base of another name or path (a hub id, and the plan's local model folder) loads with a warning
    naming both.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir).expanduser()
    adapter_cfg = check_adapter_files(adapter_dir)
    base = get_base(model)
    used = str(expected_base or getattr(base, "name_or_path", "") or base.config._name_or_path or "")
    check_adapter_fits(base, adapter_dir, adapter_cfg.get("base_model_name_or_path") or "", used)
    with peft_errors(adapter_dir), _quiet_peft_wrap():
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)
    if not is_trainable:
        peft_model.eval()
    log.info("Loaded LoRA adapter %s (r=%s) onto %s", adapter_dir, adapter_cfg.get("r"), used)
    return peft_model


# --------------------------------------------------------------------------------------------
# Scale, merge, identity
# --------------------------------------------------------------------------------------------
# LoraLayer attribute: the adapters scale 0 switched off
_OFF_AT_SCALE_ZERO = "_lora_toolkit_adapters_off_at_scale_0"


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Scale the active adapter's update (0 = exactly the base model, 1 = full adapter).

    Scale 0 switches the adapter off in every LoRA layer (no active adapter: the layer computes its
    base layer alone, and a merge merges nothing). peft's set_scale(0) alone zeroes B·A but leaves a
    DoRA adapter's magnitude vector rescaling the weights, so a DoRA adapter at "scale 0" would not
    be the base model. peft's disable_adapter() context (evaluate's base model) leaves that off on
    exit; another scale switches the same adapters back on. Layers the adapter saved whole (peft's
    modules_to_save) take the same strength: ``scale_saved_modules``."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    scale = float(scale)
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            _set_saved_module_scale(module, scale)
        if not isinstance(module, LoraLayer):
            continue
        off = getattr(module, _OFF_AT_SCALE_ZERO, None)
        names = list(off) if off is not None else list(module.active_adapters)
        for name in names:
            module.set_scale(name, scale)
        if scale == 0.0 and off is None:
            setattr(module, _OFF_AT_SCALE_ZERO, names)
            # (peft's own field behind active_adapters; set_adapter would touch grads)
            module._active_adapter = []
        elif scale != 0.0 and off is not None:
            module._active_adapter = names
            delattr(module, _OFF_AT_SCALE_ZERO)


# the saved module's own (full-strength) weights, kept beside it while a strength other than 1 is set
_FULL_WEIGHTS = "_lora_toolkit_full_weights"


def scale_saved_module(wrapper, name: str, scale: float) -> None:
    """A layer adapter ``name`` saved whole (peft's ``modules_to_save``: e.g. a retrained LM head
    from another trainer) at strength ``scale``: its weights become ``W_base + scale * (W_saved -
    W_base)``, the straight line a LoRA update follows (``W + scale * B A``): 1 = the saved layer, 0
    = the base layer, 0.5 halfway, above 1 beyond. The saved weights are kept (on the layer's
    device) so another strength can be set later."""
    import torch

    saved = wrapper.modules_to_save[name]
    full = saved.__dict__.get(_FULL_WEIGHTS)
    if full is None:
        if scale == 1.0:
            return
        full = {k: v.detach().clone() for k, v in saved.named_parameters()}
        saved.__dict__[_FULL_WEIGHTS] = full  # a plain attribute: neither a parameter nor saved
    base = dict(wrapper.original_module.named_parameters())
    with torch.no_grad():
        for k, p in saved.named_parameters():
            w = full[k]
            if scale == 1.0 or not p.is_floating_point():
                p.copy_(w)
            else:
                b = base[k].to(device=w.device, dtype=w.dtype)
                p.copy_(b + scale * (w - b))


def _set_saved_module_scale(wrapper, scale: float) -> None:
    """``set_lora_scale`` for one ModulesToSaveWrapper: 0 switches it off (the base layer itself,
    exactly; another scale switches the same adapter back on), any other strength scales it."""
    off = getattr(wrapper, _OFF_AT_SCALE_ZERO, None)
    names = list(off) if off is not None else list(wrapper.active_adapters)
    if scale == 0.0:
        if off is None:
            setattr(wrapper, _OFF_AT_SCALE_ZERO, names)
            wrapper._active_adapter = []  # (peft's own field: no active adapter = the base layer)
        return
    if off is not None:
        wrapper._active_adapter = names[0] if len(names) == 1 else names
        delattr(wrapper, _OFF_AT_SCALE_ZERO)
    for name in names:
        scale_saved_module(wrapper, name, scale)


def merge_lora(model: nn.Module):
    """Fold the LoRA update into the weights and return the plain base model."""
    return model.merge_and_unload()


def text_encoder_has_lora(model: nn.Module) -> bool:
    """True when LoRA layers sit in the text encoder (train_text_encoder): cached text states are
    then wrong for the adapted model, and captions are encoded on the fly."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(mod, LoraLayer) and "text_encoder" in name for name,
               mod in model.named_modules())


def adapter_identity(adapter_dir) -> dict:
    """Path, content hash of the adapter weights, and what adapter_config.json says about it."""
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    h = hashlib.sha256()
    with open(weights, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    out = {"path": str(adapter_dir.resolve()), "weights_sha256": h.hexdigest()}
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = {}
    for key in ("base_model_name_or_path", "r", "lora_alpha", "use_dora", "use_rslora"):
        if key in cfg:
            out[key] = cfg[key]
    trigger = adapter_trigger(adapter_dir)
    if trigger:
        out["trigger_word"] = trigger
    return out


def adapter_trigger(adapter_dir) -> Optional[dict]:
    """The trigger word the adapter was trained with ({"word", "position"}), from the config.yaml
    train_lora.py saves beside it; None without one (or for an adapter from another trainer)."""
    import yaml

    try:
        saved = yaml.safe_load((Path(adapter_dir) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    data = saved.get("data") if isinstance(saved, dict) else None
    word = data.get("trigger_word") if isinstance(data, dict) else None
    if not isinstance(word, str) or not word.strip():
        return None
    return {"word": word.strip(), "position": str(data.get("trigger_position") or "start")}


def trigger_note(adapter_dir) -> str:
    """One line for the user about the adapter's trigger word ('' without one)."""
    t = adapter_trigger(adapter_dir)
    if not t:
        return ""
    where = "replaced every caption" if t["position"] == "replace" else f"at the {t['position']} of every caption"
    return (f"{Path(adapter_dir).name} was trained with the trigger word {t['word']!r} ({where}): "
            f"put it in your prompts to call up the style")


# --------------------------------------------------------------------------------------------
# Several adapters at once (peft's multi-adapter machinery: each adapter its own name and scale, all active)
# --------------------------------------------------------------------------------------------
# peft adapter names of the 2nd, 3rd, ... adapter of a mix (the first is peft's "default")
MIX_NAME = "adapter_{}"


def check_mix_bases(paths: list) -> list[str]:
    """Problems (in the user's words) with mixing these adapter folders: each must be a LoRA
    adapter, and all of them must record the same base model (the same folder, hub id or model
    name). Read from adapter_config.json alone, before any model loads. An adapter that records no
    base is not compared."""
    problems, bases = [], []
    for path in paths:
        try:
            cfg = check_adapter_files(path)
        except UserError as e:
            problems.append(f"lora_model_path: {e}")
            continue
        recorded = cfg.get("base_model_name_or_path") or ""
        if recorded:
            bases.append((str(path), recorded))
    for path, recorded in bases[1:]:
        first_path, first = bases[0]
        if not (same_base(first, recorded) or same_model_name(first, recorded)):
            problems.append(f"The adapters cannot be mixed: {first_path} was trained on base model "
                            f"{first} but {path} on {recorded} "
                            f"({Path(path) / 'adapter_config.json'}: base_model_name_or_path). Mix "
                            f"only adapters trained on the same base model.")
    return problems


def set_adapter_scales(model: nn.Module, scales: dict) -> None:
    """Make every adapter of ``scales`` (peft adapter name -> strength) active at its own strength:
    each LoRA layer adds each active adapter's update times its scaling (peft's ``set_scale``;
    peft's ``set_adapter`` with several names). An adapter at 0 is left out of the active set, so it
    adds nothing (DoRA's magnitude too); all at 0 is the base model. A layer an adapter saved whole
    (modules_to_save) takes its adapter's strength (``scale_saved_module``)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, scale in scales.items():
                module.set_scale(name, float(scale))
    active = [name for name, scale in scales.items() if float(scale) != 0.0]
    try:
        model.base_model.set_adapter(active, inference_mode=True)
    # peft refuses two adapters that both replace a whole module (modules_to_save)
    except ValueError as e:
        raise UserError(f"These adapters cannot be active together: {e} Two of them replace the "
                        f"same layer as a whole (modules_to_save); use them one at a time, or give "
                        f"one of them lora_scale 0."
                        ) from None
    for module in model.modules():  # layers saved whole take their adapter's strength
        if isinstance(module, ModulesToSaveWrapper):
            for name in module.modules_to_save:
                if name in active:
                    scale_saved_module(module, name, float(scales[name]))


def load_adapters(model: nn.Module, paths: list, scales: list, expected_base: Optional[str] = None):
    """Load one or several saved LoRA adapters onto the base model, each at its scale; returns
    (PeftModel, list of each adapter's identity with its peft name and scale). One adapter is
    ``load_lora`` + ``set_lora_scale`` as always; several are loaded side by side with peft's
    ``load_adapter`` (each checked against the base first) and made active together
    (``set_adapter_scales``): the model adds their updates, each times its own scale."""
    if len(paths) != len(scales):
        raise UserError(f"{len(paths)} adapter(s) but {len(scales)} lora_scale value(s): give one "
                        f"scale per adapter.")
    problems = check_mix_bases(paths) if len(paths) > 1 else []
    validate(problems)
    peft_model = load_lora(model, paths[0], is_trainable=False, expected_base=expected_base)
    names = ["default"]
    base = get_base(peft_model)
    used = str(expected_base or getattr(base, "name_or_path", "") or base.config._name_or_path or "")
    for i, path in enumerate(paths[1:], 1):
        adapter_dir = Path(path).expanduser()
        cfg = check_adapter_files(adapter_dir)
        check_adapter_fits(base, adapter_dir, cfg.get("base_model_name_or_path") or "", used)
        names.append(MIX_NAME.format(i))
        with peft_errors(adapter_dir):
            peft_model.load_adapter(str(adapter_dir), adapter_name=names[-1], is_trainable=False)
        log.info("Loaded LoRA adapter %s (r=%s) as %r", adapter_dir, cfg.get("r"), names[-1])
    if len(paths) == 1:
        set_lora_scale(peft_model, scales[0])
    else:
        set_adapter_scales(peft_model, dict(zip(names, scales)))
    peft_model.eval()
    ids = [dict(adapter_identity(p), adapter_name=n, scale=float(s)) for p, n,
           s in zip(paths, names, scales)]
    return peft_model, ids


def describe_choice(base: str, paths: list, scales: list, default_path: bool,
                    why_none: str = "") -> str:
    """The start-up line that says which model generates: the base model and each adapter with its
    scale, or the base model alone (``why_none``: why), and how to get the other."""
    if not paths:
        return (f"Model: {base}, no adapter: base model alone "
                f"({why_none or 'lora_model_path: none'}). To apply a trained adapter, pass "
                f"--lora_model_path FOLDER (train_lora.py writes output/best_model).")
    mix = " + ".join(f"adapter {p} (scale {s:g})" for p, s in zip(paths, scales))
    why = " (the default lora_model_path, found on disk)" if default_path else ""
    return f"Model: base model {base} + {mix}{why}. For the base model alone, pass --lora_model_path none."
