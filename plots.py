"""The one spectrogram figure, shared by the training samples and the listening page.

    plot_spectrograms(path, [(title, audio), ...], seam_seconds=None, window_marks=(), title=None)

Each row is the log-mel spectrogram of one mono 24 kHz signal ([N] or [1, N], tensor or numpy), in
the framing the mel loss uses (listening_metrics.log_mel: 1024-point STFT, hop 256, 80 mel bands,
0-8 kHz), so the picture shows what the loss sees. Rows are stacked on one time axis in seconds and
share one colour scale (the colour bar, natural-log mel magnitude), spanning SPECTROGRAM_RANGE below
the loudest cell of all rows: a quiet continuation looks quiet next to a loud target.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from codec import SAMPLE_RATE
from listening_metrics import log_mel
from utils import atomic_path

SPECTROGRAM_RANGE = math.log(1e4)   # colour range: 80 dB of magnitude below the peak (log(1e-5) floor is -11.5)
ROW_INCHES = 2.2                    # height of one row
DPI = 80


def _colour_limits(specs: list) -> tuple[float, float]:
    """(vmin, vmax) shared by every row: the loudest cell, and SPECTROGRAM_RANGE below it at most."""
    vmax = max(float(spec.max()) for spec in specs)
    vmin = max(min(float(spec.min()) for spec in specs), vmax - SPECTROGRAM_RANGE)
    return vmin, vmax


def _seconds(audio) -> float:
    """Duration of a mono 24 kHz signal [N] or [1, N]."""
    return int(audio.shape[-1]) / SAMPLE_RATE


def _x_label(seam_seconds, window_marks) -> str:
    marks = []
    if seam_seconds is not None:
        marks.append("dashed line: end of the context")
    if window_marks:
        marks.append("dotted: where the model's autoregressive windows join")
    return "seconds" + (f" ({'; '.join(marks)})" if marks else "")


def plot_spectrograms(path, rows: list[tuple[str, torch.Tensor]], seam_seconds: float | None = None,
                      window_marks: tuple[float, ...] = (), title: str | None = None) -> Path:
    """Write a PNG of the rows' log-mel spectrograms, stacked (module docstring); returns the path.

    seam_seconds: a dashed line on every row (where the context ends); window_marks: dotted lines on
    every row (seconds); title: above the figure. Written atomically (utils.atomic_path).
    """
    if not rows:
        raise ValueError("plot_spectrograms: no rows to draw")
    import matplotlib
    matplotlib.use("Agg")      # no display on training nodes
    import matplotlib.pyplot as plt

    specs = [log_mel(audio).numpy() for _, audio in rows]
    vmin, vmax = _colour_limits(specs)
    durations = [_seconds(audio) for _, audio in rows]
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, ROW_INCHES * len(rows) + (0.4 if title else 0.0)),
                             squeeze=False, sharex=True, layout="constrained")   # room for titles and the bar
    for ax, (row_title, _), spec, seconds in zip(axes[:, 0], rows, specs, durations):
        image = ax.imshow(spec, origin="lower", aspect="auto", cmap="magma", vmin=vmin, vmax=vmax,
                          extent=(0.0, seconds, 0, spec.shape[0]), interpolation="nearest")
        if seam_seconds is not None:
            ax.axvline(seam_seconds, color="cyan", linewidth=1.5, linestyle="--")
        for mark in window_marks:
            ax.axvline(mark, color="white", linewidth=0.8, linestyle=":")
        ax.set_xlim(0.0, max(durations))
        ax.set_title(row_title, fontsize=10, loc="left")
        ax.set_ylabel("mel band")
    axes[-1, 0].set_xlabel(_x_label(seam_seconds, window_marks))
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


__all__ = ["SPECTROGRAM_RANGE", "plot_spectrograms"]
