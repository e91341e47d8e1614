"""The evaluation report: a summary table (stdout + HTML), charts and spectrograms (matplotlib,
Agg), report.html.

report.html links its media with relative paths (audio/, spectrograms/, charts/ next to it), so the
whole evaluation folder can be copied or zipped and still plays. Every piece of text that reaches
the HTML goes through ``html.escape`` (captions and paths are user input).
"""

from __future__ import annotations

import html
import json
import math
import platform
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import quote

import numpy as np

import lora
from lora.common.files import atomic_write_text
from lora.scoring import verdicts
from lora.scoring.plots import MODEL_LABELS, make_charts, training_curve
from lora.scoring.plots import get as _get

# --------------------------------------------------------------------------------------------
# Summary table
# --------------------------------------------------------------------------------------------
# the copy check's row: its own one-sided test (copy_check.compare) flags a fine-tune that copies
# more than the base; it names no winner, so the summary's 5% for "better" is not spent on it
COPY_ROW = "copied time (share, near-copies)"
COPY_FLAG = ("FLAG: the fine-tune reproduces its training audio more than the base model: train "
             "fewer epochs, add more data, or use a lower rank")
# summary row -> the interval of its LoRA - base difference in generation.intervals.metrics
INTERVAL_KEYS = {
    "failed clips (share)": "failed_share",
    "FAD (EnCodec latents)": "encodec.fad", "KAD ×100 (EnCodec)": "encodec.kad",
    "FAD (librosa features)": "librosa.fad", "KAD ×100 (librosa)": "librosa.kad",
    "KAD ×100 (librosa clip statistics)": "librosa.kad_clip_statistics",
    "CLAP text-audio score": "clap",
    "chroma similarity to the melody": "chroma",
}


def _ci_note(iv: dict, unit: str) -> str:
    pct = int(round(100 * iv["confidence"]))
    if iv.get("ci_low") is None:
        return f"no {pct}% CI"
    return f"Δ {pct}% CI [{_fmt(iv['ci_low'])}, {_fmt(iv['ci_high'])}], {unit}, {iv['n_boot']} resamples"


def _p_note(p, alpha: float, what: str) -> str:
    return "" if p is None else f"permutation p {_fmt(float(p), 3)} ({what}; a winner needs <= {alpha:g})"


def summary_rows(results: dict) -> list[dict]:
    """Rows {metric, base, lora, delta, better, lower_is_better, note} for the models that were
    evaluated.

    "better" names a model only where its test says so, with at most ``verdicts.ALPHA`` (5%) chance
    of naming any winner in the whole summary when nothing differs (lora.scoring.verdicts): the
    held-out cross-entropy (and perplexity) by a sign-flip permutation test over recordings, the
    generated-audio rows (failure share, FAD, KAD, CLAP, chroma) by one over prompts, adjusted
    together (max-T); the two families share the 5% (2.5% each). A row says "unclear" when its p is
    above its share, and "too few recordings / prompts: needs N (k more)" when it has fewer units
    than any test could name a winner with (``verdicts.min_units``)."""
    models = results.get("models_evaluated", [])
    rows: list[dict] = []
    lk = results.get("likelihood") or {}
    gen = results.get("generation") or {}
    intervals = _get(gen, "intervals", "metrics") or {}
    both = {"base", "lora"} <= set(models)
    alpha = verdicts.alphas(bool(lk.get("difference")), both and bool(gen) and not gen.get("skipped"))
    copies = gen.get("copy_check") or {}

    def add(metric, getter, lower_is_better: Optional[bool], note: str = ""):
        vals = {m: getter(m) for m in ("base", "lora")}
        if all(vals[m] is None for m in models):
            return
        row = {"metric": metric, "base": vals["base"] if "base" in models else None,
               "lora": vals["lora"] if "lora" in models else None, "delta": None, "better": None,
               "lower_is_better": lower_is_better, "note": note}
        if row["base"] is not None and row["lora"] is not None:
            row["delta"] = row["lora"] - row["base"]
            if lower_is_better is not None:
                row["better"] = "same" if row["delta"] == 0 else "unclear"
            if metric in INTERVAL_KEYS and lower_is_better is not None:
                _interval_verdict(row, intervals.get(INTERVAL_KEYS[metric]), alpha["generated"])
        rows.append(row)

    _likelihood_rows(add, rows, lk, alpha["likelihood"])
    sig = gen.get("signal") or {}
    add("failed clips (share)", lambda m: _get(sig, m, "failure_rate"), True)
    for space, label in (("encodec", "EnCodec"), ("librosa", "librosa")):
        add(f"FAD ({label} latents)" if space == "encodec" else "FAD (librosa features)",
            lambda m, s=space: _get(gen, "distances", m, s, "fad"), True)
        add(f"KAD ×100 ({label})", lambda m, s=space: _get(gen, "distances", m, s, "kad", "value"), True)
    add("KAD ×100 (librosa clip statistics)",
        lambda m: _get(gen, "distances", m, "librosa", "kad_clip_statistics", "value"), True)
    div = gen.get("diversity") or {}
    add("diversity across prompts", lambda m: _get(div, m, "across_prompts"), None,
        "higher = prompts lead to different music")
    add("diversity across seeds", lambda m: _get(div, m, "across_seeds"), None, "near 0 = mode collapse")
    clap = gen.get("clap") or {}
    add("CLAP text-audio score", lambda m: _get(clap, m, "mean"), False)
    add("CLAP shuffled-prompt baseline", lambda m: _get(clap, m, "shuffled_mean"), None)
    mel = gen.get("melody") or {}
    add("chroma similarity to the melody", lambda m: _get(mel, m, "mean"), False,
        "melody models: how closely the output follows the given tune")
    add("chroma similarity, shuffled melody (floor)", lambda m: _get(mel, m, "shuffled_mean"), None)
    add("mean loudness (LUFS)", lambda m: _get(sig, m, "mean_lufs"), None)
    _copy_rows(add, rows, copies)
    return rows


def _copy_rows(add, rows: list, copies: dict) -> None:
    """The copy check: the share of generated time in passages copied from the training audio, the
    exact-copy share and the longest passage. The first row's "better?" column holds the flag of
    copy_check.compare instead of a winner: "FLAG" (the fine-tune copies more than the base: its
    interval above 0 and its one-sided sign-flip test over prompts at 5%), "no flag", or "too few
    prompts" (below copy_check.MIN_PROMPTS)."""
    if not copies:
        return
    add(COPY_ROW, lambda m: _get(copies, m, "near", "mean_share"), None,
        f"passages of {copies.get('min_seconds', 1):g} s or more that reproduce a training clip; the "
        f"base model is the floor")
    cmp = copies.get("comparison") or {}
    row = rows[-1] if rows and rows[-1]["metric"] == COPY_ROW else None
    if row is not None and cmp.get("verdict"):
        row["better"] = ("FLAG" if cmp.get("flag") else
                         "too few prompts" if cmp["verdict"] == "too few prompts" else "no flag")
        if cmp.get("note"):
            row["note"] += f"; {cmp['note']}"
    if row is not None and cmp.get("flag"):
        row["note"] = f"{COPY_FLAG}; {row['note']}"
    add("copied time (share, exact copies)", lambda m: _get(copies, m, "exact", "mean_share"), None)
    add("longest copied passage (s)", lambda m: _get(copies, m, "near", "longest", "longest_s"), None)


def _interval_verdict(row: dict, iv: Optional[dict], alpha: float) -> None:
    """A generated-audio row's verdict: its family-adjusted permutation p (over prompts) against
    ``alpha``, with at least ``verdicts.min_units(alpha)`` prompts; its bootstrap interval is
    shown beside it."""
    if iv is None or "p_adjusted" not in iv:
        row["better"] = "unclear" if row["better"] in ("LoRA", "base", "unclear") else row["better"]
        row["note"] = "; ".join(x for x in (row["note"], "no test of the difference") if x)
        return
    units = f"n={iv.get('n_pairs')} (prompt, seed) pairs from {iv.get('n_units')} prompts"
    p = _p_note(iv["p_adjusted"], alpha, "over prompts, adjusted for the generated-audio rows")
    row["note"] = "; ".join(x for x in (row["note"], _ci_note(iv, units), p) if x)
    row["better"] = verdicts.verdict(row["delta"], iv["p_adjusted"], iv.get("n_units"), alpha,
                                     bool(row["lower_is_better"]), "prompt")


def _likelihood_rows(add, rows: list, lk: dict, alpha: float) -> None:
    """Held-out cross-entropy (with its cluster-bootstrap interval and its permutation test over
    recordings) and perplexity (exp(CE): the same evidence, the same verdict)."""
    diff = lk.get("difference")
    note = ""
    if diff:
        pct = int(round(100 * diff["confidence"]))
        n_clips = diff.get("n_clips", diff["n"])
        n_rec = diff.get("n_recordings")
        counts = f"n={n_clips} clips" + (f" from {n_rec} recordings" if n_rec is not None else "")
        note = "; ".join(x for x in (f"Δ {pct}% CI [{diff['ci_low']:+.4f}, {diff['ci_high']:+.4f}], "
                                     f"{counts}",
                                     _p_note(diff.get("p_permutation"), alpha, "over recordings"))
                         if x)
    add("held-out cross-entropy (nats)", lambda m: _get(lk, m, "ce"), True, note)
    ce_row = rows[-1] if rows and rows[-1]["metric"] == "held-out cross-entropy (nats)" else None
    if ce_row is not None and ce_row["delta"] is not None:
        d = diff or {}
        ce_row["better"] = verdicts.verdict(ce_row["delta"], d.get("p_permutation"), d.get("n_recordings"),
                                            alpha, True, "recording")
    add("held-out perplexity", lambda m: _get(lk, m, "ppl"), True)
    if ce_row is not None and rows[-1] is not ce_row and rows[-1]["better"] is not None:
        rows[-1]["better"] = ce_row["better"]  # exp(CE): the same evidence, the same verdict


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.{digits}f}"
    return str(v)


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table: metric | base | LoRA | Δ | better?"""
    header = ["metric", "base", "LoRA", "Δ", "better?"]
    body = [[r["metric"], _fmt(r["base"]), _fmt(r["lora"]),
             ("-" if r["delta"] is None else ("+" if r["delta"] > 0 else "") + _fmt(r["delta"])),
             r["better"] or "-"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(header), "-+-".join("-" * w for w in widths)] + [line(b) for b in body]
    notes = [f"  {r['metric']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(out + (["notes:"] + notes if notes else []))


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
def e(x) -> str:
    """HTML-escape anything (quotes included, so it is safe in attributes too)."""
    return html.escape(str(x), quote=True)


def _src(rel: str) -> str:
    return e(quote(rel))


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;max-width:1280px;color:#222}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0} td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f5f5f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
.better-LoRA{color:#0a7a32;font-weight:600} .better-base{color:#b0302a;font-weight:600}
.prompt{border:1px solid #e3e3e3;border-radius:6px;padding:10px;margin:12px 0}
.caption{font-weight:600;margin-bottom:6px;white-space:pre-wrap}
.pair{display:flex;gap:16px;flex-wrap:wrap;margin:6px 0} .clip{flex:1;min-width:320px}
.clip img{width:100%;max-width:520px;display:block} audio{width:100%;max-width:520px}
.fail{color:#b0302a;font-size:12px} .muted{color:#777;font-size:12px}
img.chart{max-width:100%;margin:6px 0}
"""


def _kv_table(d: dict) -> str:
    def show(v):
        return json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v

    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(show(v))}</td></tr>" for k, v in d.items())
    return f"<table>{rows}</table>"


def render_html(results: dict, charts: dict[str, str], loss_curve: Optional[str] = None) -> str:
    models = results.get("models_evaluated", [])
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>{e('MusicGen LoRA evaluation')}</title><style>{CSS}</style></head><body>",
             "<h1>MusicGen LoRA evaluation</h1>"]
    ident = results.get("identity") or {}
    parts.append("<h2>Models</h2>")
    for m in models:
        parts.append(f"<h3>{e(MODEL_LABELS.get(m, m))}</h3>{_kv_table(ident.get(m) or {})}")
    # Summary
    rows = results.get("summary") or summary_rows(results)
    parts.append("<h2>Summary</h2><table><tr><th>metric</th><th>base</th><th>LoRA</th><th>Δ</th><th>better?</th>"
                 "<th>note</th></tr>")
    for r in rows:
        delta = "-" if r["delta"] is None else ("+" if r["delta"] > 0 else "") + _fmt(r["delta"])
        better = r.get("better") or "-"
        parts.append(f"<tr><td>{e(r['metric'])}</td><td class='num'>{e(_fmt(r['base']))}</td>"
                     f"<td class='num'>{e(_fmt(r['lora']))}</td><td class='num'>{e(delta)}</td>"
                     f"<td class='better-{e(better)}'>{e(better)}</td>"
                     f"<td class='muted'>{e(r.get('note', ''))}</td></tr>")
    parts.append("</table>")
    for note in results.get("notes", []):
        parts.append(f"<p class='muted'>{e(note)}</p>")
    # Charts
    if charts or loss_curve:
        parts.append("<h2>Charts</h2>")
        for name in ("likelihood", "distances", "signal"):
            if name in charts:
                parts.append(f"<img class='chart' src='{_src(charts[name])}' alt='{e(name)} chart'>")
        if loss_curve:
            parts.append(f"<h3>Training loss</h3>"
                         f"<img class='chart' src='{_src(loss_curve)}' alt='training loss curve'>")
    # Generation
    gen = results.get("generation") or {}
    parts += _copy_html(gen.get("copy_check"), models)
    if gen.get("skipped"):
        parts.append(f"<h2>Generated audio</h2><p class='muted'>{e(gen['skipped'])}</p>")
    clips = gen.get("clips") or []
    if clips:
        parts.append("<h2>Generated audio</h2><p class='muted'>Same prompt, same seed, same "
                     "settings for both models. Spectrograms: log-mel, dB.</p>")
        by_prompt: dict[int, list[dict]] = {}
        for c in clips:
            by_prompt.setdefault(c["prompt_index"], []).append(c)
        prompts = gen.get("prompts") or []
        for pi in sorted(by_prompt):
            text = prompts[pi] if pi < len(prompts) else ""
            parts.append(f"<div class='prompt'><div class='caption'>{pi + 1}. {e(text)}</div>")
            seeds = sorted({c["seed"] for c in by_prompt[pi]})
            for sd in seeds:
                parts.append(f"<div class='muted'>seed {e(sd)}</div><div class='pair'>")
                for m in models:
                    c = next((c for c in by_prompt[pi] if c["seed"] == sd and c["model"] == m), None)
                    if c is None:
                        continue
                    parts.append(f"<div class='clip'><div>{e(MODEL_LABELS.get(m, m))}</div>")
                    if c.get("wav"):
                        parts.append(f"<audio controls preload='none' src='{_src(c['wav'])}'></audio>")
                    if c.get("spectrogram"):
                        parts.append(f"<img src='{_src(c['spectrogram'])}' alt='spectrogram {e(m)} "
                                     f"prompt {pi + 1} seed {e(sd)}'>")
                    fails = (c.get("checks") or {}).get("failures") or []
                    if fails:
                        parts.append(f"<div class='fail'>failed checks: {e(', '.join(fails))}</div>")
                    parts.append(_clip_copy_html(c.get("copy")))
                    parts.append("</div>")
                parts.append("</div>")
            parts.append("</div>")
    parts += _progression_html(results.get("training_samples"))
    # Details
    sig = gen.get("signal") or {}
    if sig:
        parts.append("<h2>Signal checks</h2>")
        for m in models:
            if m in sig:
                s = {k: v for k, v in sig[m].items()}
                parts.append(f"<h3>{e(MODEL_LABELS.get(m, m))}</h3>{_kv_table(s)}")
    clap = gen.get("clap")
    if clap:
        parts.append("<h2>CLAP</h2>")
        if clap.get("skipped"):
            parts.append(f"<p class='muted'>{e(clap['skipped'])}</p>")
        else:
            parts.append(_kv_table({k: v for k, v in clap.items() if k != "per_clip"}))
    parts.append("<h2>Settings</h2>" + _kv_table(results.get("settings") or {}))
    parts.append("<h2>Versions</h2>" + _kv_table(results.get("versions") or {}))
    parts.append("</body></html>")
    return "\n".join(parts)


def _passage(p: Optional[dict]) -> str:
    if not p or not p.get("longest_s"):
        return "none"
    return (f"{p['longest_s']:.2f} s of {p['clip']} from {p['clip_at_s']:.2f} s (at {p['at_s']:.2f} s "
            f"of the generated clip{', ' + str(p['generated']) if p.get('generated') else ''})")


def _copy_html(cc: Optional[dict], models: list) -> list[str]:
    """The copy check: each model's shares and longest passage side by side, and the verdict."""
    if not cc:
        return []
    out = [f"<h2>Copy check: does it reproduce the training audio?</h2><p class='muted'>{e(cc['what'])}. "
           f"Index: {e(cc['index']['n_clips'])} training clips, {e(round(cc['index']['seconds']))} s.</p>"]
    cmp = cc.get("comparison")
    if cmp:
        cls = "fail" if cmp.get("flag") else "muted"
        ci = ("" if cmp.get("ci_low") is None else
              f" Δ share {cmp['diff']:+.3f}, {int(round(100 * cmp['confidence']))}% CI "
              f"[{cmp['ci_low']:+.3f}, {cmp['ci_high']:+.3f}] over {cmp['n_prompts']} prompts.")
        out.append(f"<p class='{cls}'><b>{e(cmp['verdict'])}</b>: {e(cmp['note'])}.{e(ci)}</p>")
    rows = "".join(
        f"<tr><td>{e(MODEL_LABELS.get(m, m))}</td><td class='num'>{e(_fmt(_get(cc, m, 'near', 'mean_share')))}</td>"
        f"<td class='num'>{e(_fmt(_get(cc, m, 'exact', 'mean_share')))}</td>"
        f"<td class='num'>{e(_get(cc, m, 'near', 'clips_with_copies'))} of {e(_get(cc, m, 'n_clips'))}</td>"
        f"<td>{e(_passage(_get(cc, m, 'near', 'longest')))}</td></tr>" for m in models if cc.get(m))
    out.append("<table><tr><th>model</th><th>copied time (near)</th><th>copied time (exact)</th>"
               f"<th>clips with copies</th><th>longest copied passage</th></tr>{rows}</table>")
    return out


def _clip_copy_html(check: Optional[dict]) -> str:
    if not check or not (check["near"]["share"] or check["exact"]["share"]):
        return ""
    return (f"<div class='fail'>copies training audio: {100 * check['near']['share']:.0f}% of its "
            f"time; longest {e(_passage(check['near']))}</div>")


def _progression_html(ts: Optional[dict]) -> list[str]:
    """The training samples: the same prompts and seeds at every sampled step, step 0 = the base
    model."""
    if not ts or not ts.get("steps"):
        return []
    steps = ts["steps"]
    out = [f"<h2>Training samples: how the run learned</h2><p class='muted'>{e(ts['note'])}</p>",
           "<table><tr><th>prompt · seed</th>" + "".join(
               f"<th>step {e(s['step'])}{' (base)' if s['step'] == 0 else ''}</th>" for s in steps)
           + "</tr>"]
    for i, first in enumerate(steps[0]["samples"]):
        cells = []
        for s in steps:
            x = s["samples"][i] if i < len(s["samples"]) else None
            share = "" if not x or not x.get("copy_share") else \
                f"<div class='fail'>copied {100 * x['copy_share']:.0f}%</div>"
            cells.append("<td></td>" if not x else
                         f"<td><audio controls preload='none' src='{_src(x['wav'])}'></audio>{share}</td>")
        out.append(f"<tr><td>{e(first['prompt'][:80])} · {e(first['seed'])}</td>{''.join(cells)}</tr>")
    out.append("</table>")
    return out


def write_report(results: dict, out_dir: str | Path, adapter_dir: Optional[str | Path] = None) -> Path:
    """Charts + training curve + report.html in out_dir (atomic); returns the report's path."""
    out_dir = Path(out_dir)
    charts = make_charts(results, out_dir)
    curve = training_curve(adapter_dir, out_dir)
    path = atomic_write_text(out_dir / "report.html", render_html(results, charts, curve))
    return path


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "lora_toolkit": lora.__version__}
    for pkg in ("torch", "transformers", "peft", "accelerate", "numpy", "scipy", "librosa",
                "pyloudnorm", "soxr", "soundfile"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def jsonable(x):
    """Plain JSON: numpy scalars to Python, non-finite floats to None (JSON has no NaN/Infinity)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x
