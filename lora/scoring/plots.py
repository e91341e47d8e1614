"""Charts (matplotlib, Agg): the loss curve of a run, spectrograms and the evaluation's bar charts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from lora.common.cli import log
from lora.common.files import atomic_path
from lora.scoring.metrics import CHECK_FAILURES

MODEL_LABELS = {"base": "base", "lora": "LoRA"}


def get(d: dict, *keys):
    """d[k1][k2]..., or None where a key is missing."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base``, with forward slashes (for links in report.html)."""
    return Path(path).resolve().relative_to(Path(base).resolve()).as_posix()


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heldout_segments(history: list[dict]) -> list[list[dict]]:
    """The validations of a run's history, split where a resume changed the held-out clips (losses
    of different clips are not one curve); a base-model measurement at such a change starts its
    segment but is no point of the adapter's curve."""
    segments: list[list[dict]] = [[]]
    for h in history:
        if h.get("event") == "resume" and h.get("heldout_changed"):
            segments.append([])
        elif isinstance(h.get("val_loss"), (int, float)) and "step" in h:
            segments[-1].append(h)
    return [seg for seg in segments if seg] or [[]]


def loss_figure(history: list[dict], base_loss: Optional[float] = None, title: str = ""):
    """The training curve of a run's metrics.jsonl rows: train loss and held-out loss per optimizer
    step (and the base model's held-out loss as a line, when given). The one plot behind
    logs/loss_curve.png, report.html and the web UI's Train tab. A resume that changed the data is
    a dotted vertical line; the held-out curve restarts there when the held-out clips changed. A
    curve of one point is drawn as a marker."""
    plt = _plt()
    num = (int, float)
    tr = [(h["step"], h["loss"]) for h in history if isinstance(h.get("loss"), num) and "step" in h]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if tr:
        ax.plot(*zip(*tr), marker="o" if len(tr) == 1 else None, label="train loss", alpha=0.8)
    segments = heldout_segments(history)
    for i, seg in enumerate(segments):
        va = [(h["step"], h["val_loss"]) for h in seg if not (h.get("base") and h["step"] > 0)]
        if va:
            ax.plot(*zip(*va), "o-", color="C1", label="held-out loss" if i == len(segments) - 1
                    else "held-out loss (earlier held-out clips)", alpha=1.0 if i == len(segments) - 1
                    else 0.4)
    for h in history:
        if h.get("event") == "resume" and (h.get("train_data_changed") or h.get("heldout_changed")):
            ax.axvline(h["step"], color="gray", ls=":", lw=1.2)
            ax.annotate("data changed", (h["step"], 1.0), xycoords=("data", "axes fraction"),
                        fontsize=7, color="gray", ha="right", va="top", rotation=90)
    if base_loss is not None:
        ax.axhline(base_loss, color="gray", ls="--", lw=1, label=f"base model (held-out) {base_loss:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (mean over codebooks)")
    ax.grid(alpha=0.3)
    if tr or any(segments[0]) or base_loss is not None:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(_plain(title), fontsize=9)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    plt = _plt()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


def _plain(text: str) -> str:
    """User text for a matplotlib title: '$' would start mathtext (and can raise on unbalanced
    '$')."""
    return str(text).replace("$", r"\$")


def save_spectrogram(wav, sample_rate: int, path: str | Path, title: str = "") -> Path:
    """Log-mel spectrogram (dB) of the mono mix as a PNG."""
    import librosa
    import librosa.display

    plt = _plt()
    y = np.asarray(wav, dtype=np.float32)
    y = y.mean(axis=0) if y.ndim == 2 else y
    y = np.nan_to_num(y)
    mel = librosa.feature.melspectrogram(y=y, sr=sample_rate, n_fft=2048, hop_length=512, n_mels=96)
    db = librosa.power_to_db(mel, ref=np.max if np.any(mel) else 1.0, top_db=80)
    fig, ax = plt.subplots(figsize=(5, 2.2))
    librosa.display.specshow(db, sr=sample_rate, hop_length=512, x_axis="time", y_axis="mel", ax=ax,
                             cmap="magma")
    ax.set_title(_plain(title[:80]), fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("")
    ax.set_ylabel("")
    fig.tight_layout()
    return _save(fig, Path(path))


def _bars(ax, labels, series: dict, errors: Optional[dict] = None):
    x = np.arange(len(labels))
    w = 0.8 / max(1, len(series))
    colors = {"base": "#7f7f7f", "lora": "#1f77b4"}
    for i, (name, vals) in enumerate(series.items()):
        v = [np.nan if a is None else a for a in vals]
        err = None
        if errors and name in errors:
            err = np.array([[np.nan if a is None else a for a in e] for e in errors[name]])
        ax.bar(x + (i - (len(series) - 1) / 2) * w, v, w, label=MODEL_LABELS.get(name, name),
               color=colors.get(name), yerr=err, capsize=3)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def make_charts(results: dict, out_dir: Path) -> dict[str, str]:
    """Charts of the metrics under out_dir/charts; returns {name: relative path}."""
    plt = _plt()
    charts: dict[str, str] = {}
    models = results.get("models_evaluated", [])
    lk = results.get("likelihood") or {}
    if any(m in lk for m in models):
        K = max(len(lk[m]["ce_per_codebook"]) for m in models if m in lk)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), gridspec_kw={"width_ratios": [3, 1]})
        _bars(axes[0], [f"cb{k}" for k in range(K)],
              {m: lk[m]["ce_per_codebook"] for m in models if m in lk})
        axes[0].set_title("held-out cross-entropy per codebook (nats)", fontsize=9)
        diff = lk.get("difference")
        if diff:
            err = [[diff["diff"] - diff["ci_low"]], [diff["ci_high"] - diff["diff"]]]
            axes[1].errorbar([0], [diff["diff"]], yerr=err, fmt="o", capsize=5, color="#1f77b4")
            axes[1].axhline(0, color="k", lw=0.8)
            axes[1].set_xticks([0])
            axes[1].set_xticklabels(["LoRA - base"], fontsize=8)
            axes[1].set_title(f"Δ CE, {int(round(100 * diff['confidence']))}% CI", fontsize=9)
            axes[1].grid(axis="y", alpha=0.3)
        else:
            axes[1].axis("off")
        fig.tight_layout()
        charts["likelihood"] = relative(_save(fig, out_dir / "charts" / "likelihood.png"), out_dir)

    gen = results.get("generation") or {}
    dist = gen.get("distances") or {}
    if any(m in dist for m in models):
        fig, axes = plt.subplots(1, 4, figsize=(12, 3))
        floors = gen.get("floors") or {}
        panels = [("encodec", "fad", "FAD (EnCodec)"), ("encodec", "kad", "KAD×100 (EnCodec)"),
                  ("librosa", "fad", "FAD (librosa)"), ("librosa", "kad", "KAD×100 (librosa)")]
        for ax, (space, key, title) in zip(axes, panels):
            values = {m: get(dist, m, space, key) for m in models}
            _bars(ax, [""], {m: [v["value"] if isinstance(v, dict) else v] for m, v in values.items()})
            for fname, style in (("noise", ":"), ("codec", "--")):
                fv = get(floors, fname, space, key)
                fv = fv["value"] if isinstance(fv, dict) else fv
                if fv is not None:
                    ax.axhline(fv, color="k", ls=style, lw=1, label=f"{fname} floor")
            ax.legend(fontsize=7)
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        charts["distances"] = relative(_save(fig, out_dir / "charts" / "distances.png"), out_dir)

    sig = gen.get("signal") or {}
    if any(m in sig for m in models):
        fig, ax = plt.subplots(figsize=(7, 2.8))
        _bars(ax, list(CHECK_FAILURES),
              {m: [sig[m]["failure_rates"][f] for f in CHECK_FAILURES] for m in models
                                         if m in sig})
        ax.set_ylim(0, 1.05)
        ax.set_title("share of generated clips failing each signal check", fontsize=9)
        fig.tight_layout()
        charts["signal"] = relative(_save(fig, out_dir / "charts" / "signal.png"), out_dir)
    return charts


def training_curve(adapter_dir: Optional[str | Path], out_dir: Path) -> Optional[str]:
    """The adapter's training loss curve as out_dir/charts/training_loss.png (relative path), if
    found.

    Looks in adapter_dir/../logs: plots metrics.jsonl (train and held-out loss per step) when
    present, else copies loss_curve.png.
    """
    if not adapter_dir:
        return None
    logs = Path(adapter_dir).resolve().parent / "logs"
    target = out_dir / "charts" / "training_loss.png"
    jl = logs / "metrics.jsonl"
    if jl.is_file():
        history = []
        for line in jl.read_text(encoding="utf-8").splitlines():
            try:
                h = json.loads(line)
            except ValueError:
                continue
            if isinstance(h, dict):
                history.append(h)
        if any("step" in h and ("loss" in h or "val_loss" in h) for h in history):
            fig = loss_figure(history, title=f"training of {Path(adapter_dir).name}")
            return relative(_save(fig, target), out_dir)
    png = logs / "loss_curve.png"
    if png.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(png, tmp)
        return relative(target, out_dir)
    log.info("No training log found in %s (metrics.jsonl or loss_curve.png); the report has no "
             "loss curve", logs)
    return None
