"""Listeners that know music: pretrained note and beat trackers and a Fréchet distance in the codec's space.

The figures of a batch of continuations against their references (definitions in melody.py, beat.py, frechet.py):

    melody_f1               note-onset F-measure of transcribed notes (±50 ms, ±50 cents, no offsets)
    pitch_class_agreement   Jaccard index of the pitch classes sounding frame by frame
    beat_f1                 beat F-measure after the seam (±70 ms), beats tracked across the seam
    tempo_ratio             reference / continuation median inter-beat interval (1 = same tempo)
    frechet_codec           Fréchet distance of the two sets of codec frames (a set figure, not per example)

Listeners.batch_sums returns them as sums and counts, the way evaluation.scoring.ScoreSums keeps every figure,
so they reduce across DDP ranks with one all_reduce(SUM): per-example figures as a sum over examples with
their count, the Fréchet sets as (n, sum x, sum x x^T). The packages are optional (requirements-listeners.txt);
a missing one raises ListenerUnavailable with one line naming it and the install command.
"""
from __future__ import annotations

import warnings

import torch

from music_continuation.evaluation.listeners import frechet
from music_continuation.evaluation.listeners.beat import (
    BEAT_TRACKERS,
    BeatTracker,
    beat_f1,
    beats_after_seam,
    tempo_ratio,
)
from music_continuation.evaluation.listeners.melody import Transcriber, melody_f1, pitch_class_agreement
from music_continuation.evaluation.listeners.packages import INSTALL_COMMAND, MADMOM_LICENCE, ListenerUnavailable

LISTENER_FIGURES = ("melody_f1", "pitch_class_agreement", "beat_f1", "tempo_ratio", "frechet_codec")
# The per-example sums batch_sums adds (ScoreSums.SUM_FIELDS holds them in this order) and their counts.
LISTENER_SUMS = ("listener_examples", "melody_f1", "pitch_class_agreement", "beat_f1", "tempo_examples",
                 "tempo_ratio")
MEMO_ENTRIES = 32      # analyses kept: one batch's outputs, references and baselines


class Listeners:
    """The listeners of one evaluation, loaded once: basic-pitch, a beat tracker and the codec's encoder.

    codec None: no Fréchet distance. Analyses of the same tensor object within a batch are computed once (the
    reference serves the model and the three baselines; with codec targets the oracle IS the reference): the
    memo holds the tensors it was computed from, so an id can never be reused for other audio while memoised.
    """

    def __init__(self, codec=None, beat_tracker: str = "librosa", device="cpu"):
        self.transcriber = Transcriber(device)
        self.tracker = BeatTracker(beat_tracker)
        self.codec = codec
        self._memo: list = []

    def _remember(self, kind: str, tensors: tuple, compute):
        for held, result in self._memo:
            if held[0] == kind and all(a is b for a, b in zip(held[1:], tensors)):
                return result
        result = compute()
        self._memo.append(((kind, *tensors), result))
        del self._memo[:-MEMO_ENTRIES]
        return result

    def _transcribe(self, audio: torch.Tensor):
        return self._remember("notes", (audio,), lambda: self.transcriber(audio))

    def _beats(self, before: torch.Tensor, audio: torch.Tensor):
        def track():
            b = before.detach().float().reshape(before.shape[0], -1).cpu().numpy()
            a = audio.detach().float().reshape(audio.shape[0], -1).cpu().numpy()
            return [beats_after_seam(self.tracker, x, y) for x, y in zip(b, a)]
        return self._remember("beats", (before, audio), track)

    def _frames(self, audio: torch.Tensor) -> torch.Tensor:
        return self._remember("frechet", (audio,), lambda: frechet.frame_stats(frechet.embed(self.codec, audio)))

    @torch.no_grad()
    def batch_sums(self, output: torch.Tensor, before: torch.Tensor, reference: torch.Tensor) -> dict:
        """Sums of the figures of output [B, 1, N] against reference [B, 1, N], `before` [B, 1, M] the audio
        before the seam: {LISTENER_SUMS name: float} plus, with a codec, "frechet_output" and
        "frechet_reference" (frechet.frame_stats vectors)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # librosa and basic-pitch warn on silence, which is scored as such
            heard, real = self._transcribe(output), self._transcribe(reference)
            beats, real_beats = self._beats(before, output), self._beats(before, reference)
        ratios = [tempo_ratio(b, r) for b, r in zip(beats, real_beats)]
        ratios = [r for r in ratios if r is not None]
        sums = {"listener_examples": float(len(heard)),
                "melody_f1": sum(melody_f1(h.notes, r.notes) for h, r in zip(heard, real)),
                "pitch_class_agreement": sum(pitch_class_agreement(h.note, r.note) for h, r in zip(heard, real)),
                "beat_f1": sum(beat_f1(b, r) for b, r in zip(beats, real_beats)),
                "tempo_examples": float(len(ratios)), "tempo_ratio": float(sum(ratios))}
        if self.codec is not None:
            sums["frechet_output"] = self._frames(output)
            sums["frechet_reference"] = self._frames(reference)
        return sums


def check_available(beat_tracker: str = "librosa") -> None:
    """Import every package the listeners need now (ListenerUnavailable, one line, if one is missing)."""
    from music_continuation.evaluation.listeners import packages
    packages.basic_pitch()
    packages.mir_eval()
    if beat_tracker == "madmom":
        packages.madmom()
    else:
        packages.librosa()


__all__ = ["BEAT_TRACKERS", "INSTALL_COMMAND", "LISTENER_FIGURES", "LISTENER_SUMS", "MADMOM_LICENCE", "Listeners",
           "ListenerUnavailable", "beat_f1", "check_available", "melody_f1", "pitch_class_agreement", "tempo_ratio"]
