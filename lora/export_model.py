"""Export a fine-tune as a standalone MusicGen: base model + LoRA adapter(s) merged into one plain transformers folder.

    python lora/export_model.py --base_model_path facebook/musicgen-small --lora_model_path output/best_model \\
        --output_dir output/merged_model

More::

    --lora_model_path output/checkpoints/step-000200   a training checkpoint instead of best_model
    --lora_model_path A B --lora_scale 0.7 0.4          merge a mix of two adapters, each at its strength
    --lora_scale 0.5                                     merge the adapter at half strength
    --dtype float16 | bfloat16                           a half-size decoder (float32, the default, is the exact merge;
                                                         EnCodec and T5 stay float32 unless --cast_encoders)
    --overwrite                                          replace an existing --output_dir

The folder holds config.json, generation_config.json, model.safetensors (the decoder in --dtype), the processor's
and tokenizer's files, a model card README.md (base, each adapter's identity and scale, its training data and
held-out loss) and export_info.json (the same, machine-readable). It needs no peft and no toolkit::

    MusicgenForConditionalGeneration.from_pretrained(folder)  /  pipeline("text-to-audio", model=folder)

and it is a base model for every script here (--model_path folder): generate with it, evaluate it, or train a new
adapter on top of the fine-tune. The folder is written whole or not at all (atomic); an existing one is only
replaced with --overwrite. The merge uses peft (``merge_and_unload``) on float32 weights on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

if not __package__:  # run as a file, maybe without `pip install -e .`: see lora/_bootstrap.py
    import _bootstrap

    _bootstrap.find_package()

from lora.common.cli import UserError, log, run_main
from lora.common.fields import ConfigError, load_yaml
from lora.common.files import atomic_dir, atomic_write_json, atomic_write_text, check_free_space, check_output_dir
from lora.common.ownership import claim_output, read_record, record_document, record_path
from lora.config import adapter_paths, adapter_scales, parse_config
from lora.dataset import load_metadata
from lora.modeling.adapter import check_adapter_files, check_mix_bases, load_adapters, merge_lora
from lora.modeling.loading import family_for, load_base_model, local_model_folder

DESCRIPTION = "Merge a base MusicGen and LoRA adapter(s) into one standalone transformers model folder."
INFO_FILE = "export_info.json"
STATE_FILE = "trainer_state.json"


TOOL = "export_model.py"
# What an export wrote before it kept a record (export_info.json names it an export): these names
LEGACY_FILES = re.compile(r"config\.json|generation_config\.json|model(?:-\d+-of-\d+)?\.safetensors"
                          r"|model\.safetensors\.index\.json|README\.md|export_info\.json|"
                          r"export_config\.yaml|preprocessor_config\.json|processor_config\.json|"
                          r"tokenizer(?:_config)?\.json|special_tokens_map\.json|spiece\.model|"
                          r"added_tokens\.json")


def _ours(out: Path):
    """export_model.py's files in ``out``: those its record lists, or, in a folder an earlier
    version exported (export_info.json, no record), the files an export writes."""
    recorded = read_record(out, TOOL)
    if not recorded and (out / INFO_FILE).is_file():
        try:
            legacy = "merged_with" in json.loads((out / INFO_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            legacy = False
        if legacy:
            recorded = {p.name for p in out.iterdir() if p.is_file() and not p.is_symlink()
                        and LEGACY_FILES.fullmatch(p.name)}

    def foreign(entry: Path) -> list[Path]:
        return [] if entry.name in recorded and entry.is_file() else [entry]
    return foreign


def config_problems(cfg, ns=None) -> list[str]:
    """Everything checked before the model loads: the adapters (complete, LoRA, one base), the
    scales, and an output folder that replaces nothing the user did not ask to replace and holds
    none of the inputs."""
    e = cfg.export
    paths = adapter_paths(e)
    problems = []
    if not paths:
        problems.append("export needs an adapter: pass --lora_model_path FOLDER (best_model, "
                        "final_model or checkpoints/step-N written by train_lora.py), or several "
                        "to merge a mix.")
    try:
        adapter_scales(e, len(paths))
    except ConfigError as err:
        problems.append(str(err))
    for path in paths:
        try:
            check_adapter_files(path)
        except UserError as err:
            problems.append(f"lora_model_path: {err}")
    if len(paths) > 1 and len(problems) == 0:
        problems += check_mix_bases(paths)
    out = Path(e.output_dir).resolve()
    base = local_model_folder(cfg.model)  # (the built-in tiny models' folders too)
    try:  # the ownership rule: only an earlier export is replaced, and only with --overwrite
        claim_output(out, TOOL, writes=None, ours=_ours(out), overwrite=e.overwrite,
                     models=[("the base model", base)] + [("the adapter", x) for x in paths])
    except UserError as err:
        problems.append(str(err))
    try:
        check_output_dir(out.parent if not out.exists() else out, "--output_dir")
    except UserError as err:
        problems.append(str(err))
    return problems


def training_summary(adapter_dir) -> dict:
    """What the adapter folder says about its training (train_lora.py writes config.yaml,
    trainer_state.json, eval_results.json): data folder and clip count, steps, held-out loss. Keys
    are missing where a file is (an adapter from another trainer)."""
    adapter_dir = Path(adapter_dir)
    out: dict = {}
    if (adapter_dir / "config.yaml").is_file():
        data = load_yaml(adapter_dir / "config.yaml").get("data") or {}
        out.update(data_dir=data.get("data_dir"), metadata_file=data.get("metadata_file"))
        meta = Path(str(data.get("data_dir"))) / str(data.get("metadata_file"))
        if data.get("data_dir") and meta.is_file():
            try:
                records = load_metadata(data["data_dir"], data["metadata_file"])
                train = [r for r in records if r.split == "train"]
                out.update(train_clips=len(train),
                           train_hours=round(sum(r.duration for r in train) / 3600, 4),
                           valid_clips=len(records) - len(train))
            # the data may have changed since; the card says so rather than guess
            except UserError as err:
                out["data_note"] = f"the training data cannot be read now ({str(err)[:200]})"
    for name in (STATE_FILE, "eval_results.json"):
        f = adapter_dir / name
        if f.is_file():
            doc = json.loads(f.read_text(encoding="utf-8"))
            keys = ("global_step", "epoch", "best_metric", "best_step",
                    "base_val_loss") if name == STATE_FILE \
                else ("val_loss", "base_val_loss")
            out.update({(k if k != "val_loss" else "heldout_loss"): doc[k] for k in keys
                        if doc.get(k) is not None})
    return out


def model_card(base: str, ids: list[dict], summaries: list[dict], dtype: str, out_dir: Path,
               model_class: str = "MusicgenForConditionalGeneration") -> str:
    lines = ["---", "library_name: transformers", "pipeline_tag: text-to-audio",
             "tags: [musicgen, lora, merged]",
             "---", "", "# MusicGen fine-tune (LoRA merged into the weights)", "",
             f"- Base model: `{base}`", f"- Weights: {dtype}; a plain `{model_class}` (no peft)",
             f"- Exported: {datetime.now(timezone.utc).isoformat(timespec='seconds')} by "
             f"lora/export_model.py", ""]
    for one, s in zip(ids, summaries):
        lines.append(f"## Adapter `{one['path']}` at scale {one['scale']:g}")
        lines.append(f"- sha256 of adapter_model.safetensors: `{one['weights_sha256']}`; rank "
                     f"{one.get('r')}, alpha {one.get('lora_alpha')}; trained on "
                     f"`{one.get('base_model_name_or_path')}`")
        if s.get("data_dir"):
            clips = (f"{s['train_clips']} training clips ({s['train_hours']:.2f} h), "
                     f"{s['valid_clips']} held out, "
                     if "train_clips" in s else "")
            lines.append(f"- Training data: {clips}`{s['data_dir']}/{s['metadata_file']}`"
                         + (f" ({s['data_note']})" if s.get("data_note") else ""))
        else:
            lines.append("- Training data: not recorded (no config.yaml in the adapter folder)")
        if "global_step" in s:
            lines.append(f"- Training: {s['global_step']} optimizer steps (epoch "
                         f"{s.get('epoch', 0):.2f})")
        loss = [f"{label} {s[k]:.4f}" for k, label in (("base_val_loss", "base model"),
                                                       ("heldout_loss", "this adapter"),
                                                       ("best_metric", "best during training")) if k in s]
        lines.append("- Held-out loss (cross-entropy, mean over codebooks): "
                     + (", ".join(loss) if loss else "not recorded"))
        lines.append("")
    lines += ["## Use", "", "```python", "from transformers import pipeline", "",
              f"tts = pipeline('text-to-audio', model={str(out_dir)!r})",
              "music = tts('lofi piano with soft drums', forward_params={'do_sample': True, "
              "'max_new_tokens': 500})",
              "```", "", "```bash",
              f"python lora/inference_lora.py --base_model_path {out_dir} --lora_model_path none "
              f"--prompts \"your prompt\"", "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, _ = parse_config(argv, description=DESCRIPTION, sections=("export", "model"),
                          rules=config_problems)
    e = cfg.export
    paths = adapter_paths(e)
    scales = adapter_scales(e, len(paths))
    out = Path(e.output_dir).resolve()
    log.info("Export: base model %s + %s -> %s (%s)", cfg.model.model_path,
             " + ".join(f"adapter {p} (scale {s:g})" for p, s in zip(paths, scales)), out, e.dtype)
    log.info("Resolved settings: %s", json.dumps({"export": dataclasses.asdict(e),
                                                  "model": dataclasses.asdict(cfg.model)}, default=str))
    model, processor, info = load_base_model(cfg.model)  # float32 on the CPU: the merge is exact
    model, ids = load_adapters(model, paths, scales)
    model = merge_lora(model)
    dtype = getattr(torch, e.dtype)
    if e.cast_encoders:
        model.to(dtype)
    else:  # the codec and the text encoder stay float32: a token cache built on the export is the base's
        for module in family_for(info).decoder_modules(model):
            module.to(dtype)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    check_free_space(out.parent, n_bytes * 1.1 + 50 * 2 ** 20, f"the merged model ({e.dtype})")
    summaries = [training_summary(p) for p in paths]
    stored = e.dtype if e.cast_encoders or e.dtype == "float32" else \
        f"decoder {e.dtype}, EnCodec and text encoder float32"
    card = model_card(info.name_or_path, ids, summaries, stored, out, type(model).__name__)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        atomic_write_text(tmp / "README.md", card)
        atomic_write_json(tmp / INFO_FILE, {
            "base_model": {"name_or_path": info.name_or_path, "identity": info.identity,
                           "hub_revision": info.hub_revision},
            "adapters": [dict(one, training=s) for one, s in zip(ids, summaries)], "dtype": e.dtype,
            "weights": stored,
            "merged_with": "peft merge_and_unload on float32 weights", "created": datetime.now(
                timezone.utc).isoformat(timespec="seconds")})
        cfg.save(tmp / "export_config.yaml")
        written = [p.name for p in tmp.iterdir()]  # (the record: what --overwrite may replace)
        atomic_write_json(record_path(tmp, TOOL), record_document(TOOL, written))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"Wrote {out} ({size / 1e6:.1f} MB, {stored}): a plain transformers MusicGen. Use it with "
          f"--model_path {out} (and --lora_model_path none), or {type(model).__name__}.from_pretrained.")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
