"""Plots (lora.scoring.plots): a spectrogram PNG whatever the caption in its title."""

from __future__ import annotations

import numpy as np


def test_spectrogram_png_with_hostile_title(tmp_path):

    from lora.scoring.plots import save_spectrogram

    wav = (0.2 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)).astype(np.float32)
    # "$\\undefinedcmd$" makes matplotlib's mathtext raise unless "$" is escaped
    p = save_spectrogram(wav, 16000, tmp_path / "s" / "x.png",
                         r"lofi $\undefinedcmd$ beat, costs $5 <b>&")
    assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
