"""The one spectrogram figure, shared by the listening page and the training samples.

    plot_continuations(path, before_seam, [(title, ending), ...], context_start=None, window_joins=(), title=None)

One row per ending: the log-mel spectrogram of `before_seam` followed by that ending (mono 24 kHz
signals, [N] or [1, N], tensor or numpy), so every row holds the same audio up to the seam and only
the ending differs. The framing is the mel loss's (listening_metrics.log_mel: 1024-point STFT, hop
256, centred frames, 80 mel bands, 0-8 kHz), so the picture shows what the loss sees. The time axis
comes from the STFT frame centres (frame f is centred on sample f * 256, so its cell spans
(f +- 1/2) * 256 samples), and the seam is drawn at the exact sample where the ending begins: a frame
whose 1024-sample window reaches over the seam shows some of the ending up to 21 ms before it.
All rows share one colour scale (the colour bar, natural-log mel magnitude), spanning
SPECTROGRAM_RANGE below the loudest cell of all rows: a quiet continuation looks quiet next to a loud
target.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from music_continuation.codec import SAMPLE_RATE
from music_continuation.evaluation.listening_metrics import log_mel, mel_module
from music_continuation.utils import atomic_path

SPECTROGRAM_RANGE = math.log(1e4)   # colour range: 80 dB of magnitude below the peak (log(1e-5) floor is -11.5)
ROW_INCHES = 2.2                    # height of one row
DPI = 80


def _mono(audio) -> torch.Tensor:
    """A mono signal [N] or [1, N] (tensor or numpy) as a float32 tensor [N]."""
    return torch.as_tensor(np.asarray(audio, dtype=np.float32)).reshape(-1)


def _colour_limits(specs: list) -> tuple[float, float]:
    """(vmin, vmax) shared by every row: the loudest cell, and SPECTROGRAM_RANGE below it at most."""
    vmax = max(float(spec.max()) for spec in specs)
    vmin = max(min(float(spec.min()) for spec in specs), vmax - SPECTROGRAM_RANGE)
    return vmin, vmax


def time_extent(frames: int) -> tuple[float, float]:
    """(left, right) seconds of `frames` centred STFT frames drawn as cells: frame f spans (f -+ 1/2) * hop."""
    hop = mel_module().stft.hop_size
    return -0.5 * hop / SAMPLE_RATE, (frames - 0.5) * hop / SAMPLE_RATE


def _x_label(context_start, window_joins) -> str:
    marks = ["dashed: the seam, where the ending begins"]
    if context_start is not None:
        marks.append("solid: the context begins")
    if window_joins:
        marks.append("dotted: the model's windows join")
    return "seconds\n" + "; ".join(marks)


def plot_continuations(path, before_seam, endings: list[tuple[str, object]], context_start: int | None = None,
                       window_joins: tuple[int, ...] = (), title: str | None = None) -> Path:
    """Write a PNG of one row per ending (module docstring); returns the path.

    before_seam: the audio every row starts with (the lead-in and the context); the seam, a dashed line
    on every row, is at its last sample. context_start: the sample of before_seam where the model's
    context begins (a solid line; None when there is no lead-in). window_joins: samples after the seam
    where autoregressive windows join (dotted). Written atomically (utils.atomic_path).
    """
    if not endings:
        raise ValueError("plot_continuations: no endings to draw")
    import matplotlib
    matplotlib.use("Agg")      # no display on training nodes
    import matplotlib.pyplot as plt

    before = _mono(before_seam)
    seam = before.shape[0]
    rows = [(row_title, torch.cat([before, _mono(ending)])) for row_title, ending in endings]
    specs = [log_mel(audio).numpy() for _, audio in rows]
    vmin, vmax = _colour_limits(specs)
    right = max(audio.shape[0] for _, audio in rows) / SAMPLE_RATE
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, ROW_INCHES * len(rows) + (0.4 if title else 0.0)),
                             squeeze=False, sharex=True, layout="constrained")   # room for titles and the bar
    for ax, (row_title, _), spec in zip(axes[:, 0], rows, specs):
        image = ax.imshow(spec, origin="lower", aspect="auto", cmap="magma", vmin=vmin, vmax=vmax,
                          extent=(*time_extent(spec.shape[1]), 0, spec.shape[0]), interpolation="nearest")
        ax.axvline(seam / SAMPLE_RATE, color="cyan", linewidth=1.5, linestyle="--")
        if context_start is not None:
            ax.axvline(context_start / SAMPLE_RATE, color="cyan", linewidth=1.0)
        for join in window_joins:
            ax.axvline((seam + join) / SAMPLE_RATE, color="white", linewidth=0.8, linestyle=":")
        ax.set_xlim(0.0, right)
        ax.set_title(row_title, fontsize=10, loc="left")
        ax.set_ylabel("mel band")
    axes[-1, 0].set_xlabel(_x_label(context_start, window_joins))
    if title:
        fig.suptitle(title)
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="log mel magnitude", pad=0.01, fraction=0.03)
    path = Path(path)
    try:
        with atomic_path(path) as tmp_path:
            fig.savefig(tmp_path, dpi=DPI)
    finally:
        plt.close(fig)     # also when saving fails: figures left open leak memory over a long run
    return path


__all__ = ["SPECTROGRAM_RANGE", "plot_continuations", "time_extent"]
