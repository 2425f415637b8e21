"""listening_metrics.py on signals whose rhythm and harmony are known by construction.

References are independent of the code under test: librosa for the chroma and onset envelopes, a
numpy re-computation of the documented chroma formula, and thresholds that follow from how each
signal is built (which pitch classes it holds, where its onsets fall), not from one run.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from music_continuation.codec import SAMPLE_RATE
from music_continuation.data import demo_corpus
from music_continuation.evaluation import listening_metrics

ROOT = Path(__file__).resolve().parents[2]

C_MAJOR = (261.63, 329.63, 392.0)        # C4 E4 G4
D_MAJOR = (293.66, 369.99, 440.0)        # D4 F#4 A4
F_SHARP_MAJOR = (369.99, 466.16, 554.37)  # F#4 A#4 C#5: no pitch class in common with C major


def drum_loop(seconds=3.0, bpm=120, seed=0):
    rng = np.random.default_rng(seed)
    audio = np.zeros(int(seconds * SAMPLE_RATE))
    step = int(60 / bpm * SAMPLE_RATE / 2)
    for hit, start in enumerate(range(0, audio.size, step)):
        length = min(3000, audio.size - start)
        envelope = np.exp(-np.arange(length) / 300)
        kick = np.sin(2 * np.pi * 60 * np.arange(length) / SAMPLE_RATE)
        sound = rng.standard_normal(length) * 0.5 if hit % 2 else kick
        audio[start: start + length] += sound * envelope
    return audio.astype(np.float32)


def chord(frequencies=C_MAJOR, seconds=3.0):   # sustained sines
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (sum(np.sin(2 * np.pi * f * t) for f in frequencies) / 4).astype(np.float32)


def white_noise(samples: int, seed: int = 0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(samples)).astype(np.float32)


def demo_cycles(index: int, cycles: int = 2, key_shift: int = 0) -> tuple[np.ndarray, int]:
    """A demo track (mono) of `cycles` repeats of its 4-bar progression, and the samples per cycle.

    The progression has 4 chords (one per bar), the motifs alternate every bar and the drum fill
    comes every 4th bar, so the notes of bars 0-3 and 4-7 are the same; only drum gains are random.
    """
    plan = demo_corpus.plan_track(index, seed=0)
    plan = dataclasses.replace(plan, key=(plan.key + key_shift) % 12)
    cycle_seconds = 16 * 60.0 / plan.bpm          # 4 bars of 4 beats
    audio = demo_corpus.render_track(plan, cycles * cycle_seconds + 0.1, SAMPLE_RATE, seed=0).mean(axis=1)
    return audio.astype(np.float32), int(cycle_seconds * SAMPLE_RATE)


# ---------------------------------------------------------------------------------- the features

def test_chroma_of_a4_peaks_at_a():
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    chroma = listening_metrics.mean_chroma(np.sin(2 * np.pi * 440.0 * t)).numpy()
    assert listening_metrics.PITCH_CLASSES[int(chroma.argmax())] == "A"
    assert chroma[9] > 10 * np.delete(chroma, 9).max()


def test_chroma_matches_librosa():
    librosa = pytest.importorskip("librosa")
    for audio in (chord(), chord(D_MAJOR), drum_loop()):
        ours = listening_metrics.mean_chroma(audio).numpy()
        reference = librosa.feature.chroma_stft(y=audio, sr=SAMPLE_RATE, n_fft=4096, hop_length=1024,
                                                tuning=0.0).mean(axis=1)
        cosine = ours @ reference / (np.linalg.norm(ours) * np.linalg.norm(reference))
        assert cosine > 0.9, cosine


def test_onset_envelope_matches_librosa():
    librosa = pytest.importorskip("librosa")
    audio = drum_loop()
    ours = listening_metrics.onset_strength(audio).numpy()
    reference = librosa.onset.onset_strength(y=audio, sr=SAMPLE_RATE, n_fft=1024, hop_length=256, n_mels=80,
                                             fmax=8000.0)
    # librosa puts the flux of frames (t-1, t) at index t + n_fft // (2 * hop); ours is at t - 1.
    offset = 1 + 1024 // (2 * 256)
    count = min(ours.size, reference.size - offset)
    assert np.corrcoef(ours[:count], reference[offset: offset + count])[0, 1] > 0.85


def test_chroma_is_the_documented_concordance():
    """numpy, from the docstring: p = (chroma / w) / sum, d = p - 1/12, 2 <d_a, d_b> / (|d_a|^2 + |d_b|^2)."""
    weights = listening_metrics.chroma_filterbank().double().numpy()
    w = weights.sum(axis=1)

    def profile(audio):
        whitened = listening_metrics.mean_chroma(audio).double().numpy() / w
        return whitened / whitened.sum() - 1.0 / 12.0

    pairs = ((chord(), chord(D_MAJOR)), (chord(), drum_loop()), (drum_loop(seed=2), white_noise(SAMPLE_RATE)))
    for a, b in pairs:
        d_a, d_b = profile(a), profile(b)
        expected = 2 * d_a @ d_b / (d_a @ d_a + d_b @ d_b)
        assert listening_metrics.chroma_similarity(a, b) == pytest.approx(expected, abs=1e-6)   # float32 chroma
    # white noise's expected profile is flat: whitening divides by exactly the chroma of a flat spectrum
    flat = weights @ np.ones(weights.shape[1]) / w
    np.testing.assert_allclose(flat, 1.0, rtol=1e-12)


# ------------------------------------------------------------------------------------ similarity

def test_identical_audio_scores_one_and_unrelated_lower():
    drums, sustained = drum_loop(), chord()
    for audio in (drums, sustained):
        assert listening_metrics.rhythm_similarity(audio, audio) == pytest.approx(1.0, abs=1e-9)
        assert listening_metrics.chroma_similarity(audio, audio) == pytest.approx(1.0, abs=1e-9)
    assert listening_metrics.rhythm_similarity(drums, sustained) < 0.5
    assert listening_metrics.chroma_similarity(drums, sustained) < 0.8
    # rhythm: a 20 ms late copy still matches (lag tolerance), another tempo does not
    assert listening_metrics.rhythm_similarity(drums, np.roll(drums, 480)) > 0.9
    assert listening_metrics.rhythm_similarity(drums, drum_loop(bpm=90, seed=1)) < 0.5
    # chroma: C major against D major (shares no pitch class) is far from 1
    assert listening_metrics.chroma_similarity(sustained, chord(D_MAJOR)) < 0.3
    # both bounded by their maximum
    assert listening_metrics.rhythm_similarity(drums, drum_loop(seed=5)) <= 1.0


def test_chroma_same_piece_in_two_windows_is_high_and_another_key_low():
    """Bars 0-3 against bars 4-7 of a demo track hold the same notes: high. The same piece a tritone
    up shares only 2 of its scale's 7 pitch classes (every demo scale is a mode of major or minor)."""
    for index in range(3):
        audio, cycle = demo_cycles(index)
        first, second = audio[:cycle], audio[cycle: 2 * cycle]
        assert listening_metrics.chroma_similarity(first, second) > 0.9, index
        transposed, _ = demo_cycles(index, cycles=1, key_shift=6)
        assert listening_metrics.chroma_similarity(first, transposed[:cycle]) < 0.5, index


def test_chroma_c_major_against_f_sharp_major_is_negative():
    """No common pitch class: sum_c p_a p_b ~ 0, so 2 (0 - 1/12) / (|d_a|^2 + |d_b|^2) < 0 (ideal triads: -1/3).

    The filterbank's linear split between neighbouring classes and window leakage move a little energy,
    so allow up to -0.2 (a leak that took a quarter of each chord's energy would be needed to reach 0).
    """
    c_major, f_sharp = chord(C_MAJOR), chord(F_SHARP_MAJOR)
    assert listening_metrics.chroma_similarity(c_major, f_sharp) < -0.2
    assert listening_metrics.chroma_similarity(f_sharp, c_major) == pytest.approx(
        listening_metrics.chroma_similarity(c_major, f_sharp), abs=1e-12)      # symmetric


def test_white_noise_against_music_is_low():
    """White noise has a flat power spectrum, so its whitened profile is flat up to sampling ripple.

    Each pitch class of 2+ s of noise pools hundreds of STFT bins over tens of frames, so its share
    departs from 1/12 by a few percent: |d_noise| < 0.1 |d_music| for any music with a key (a triad:
    |d| = 0.5; demo tracks, drums included: |d| > 0.1). By Cauchy-Schwarz the figure is then at most
    2r / (1 + r^2) < 0.2 with r = 0.1. (The cosine of the mean chroma vectors scores 0.92 here.)
    """
    pieces = [chord()] + [demo_cycles(index, cycles=1)[0] for index in range(3)]
    for seed, music in enumerate(pieces):
        noise = white_noise(music.size, seed)
        d_noise = listening_metrics.pitch_profile(noise) - 1 / 12
        d_music = listening_metrics.pitch_profile(music) - 1 / 12
        ratio = float(d_noise.norm() / d_music.norm())
        assert ratio < 0.1, (seed, ratio)
        assert abs(listening_metrics.chroma_similarity(noise, music)) <= 2 * ratio / (1 + ratio ** 2) + 1e-12
        assert abs(listening_metrics.chroma_similarity(music, noise)) < 0.2, seed


def test_white_noise_against_drums_has_no_rhythm():
    """Noise's onset envelope is independent of the drums'. For independent envelopes the Pearson
    correlation over n frames has a standard deviation of about 1 / sqrt(n_eff); the envelope of 6 s
    (562 frames) is correlated over the 4 frames a 1024-point window spans, n_eff ~ 140, sd ~ 0.085,
    so 0.3 is 3.5 sd even before the max over 9 lags (seeded: the figures are reproducible)."""
    drums = drum_loop(seconds=6.0)
    for seed in range(3):
        assert listening_metrics.rhythm_similarity(white_noise(drums.size, seed), drums) < 0.3, seed
    assert listening_metrics.rhythm_similarity(drums, drum_loop(seconds=6.0, seed=4)) > 0.9   # same pattern


def test_silence_convention():
    silence = np.zeros(SAMPLE_RATE, dtype=np.float32)
    assert listening_metrics.rhythm_similarity(silence, silence) == 1.0
    assert listening_metrics.chroma_similarity(silence, silence) == 1.0
    assert listening_metrics.chroma_similarity(silence, chord(seconds=1.0)) == 0.0
    assert listening_metrics.chroma_similarity(chord(seconds=1.0), silence) == 0.0
    assert listening_metrics.rhythm_similarity(silence, drum_loop(seconds=1.0)) == 0.0
    assert listening_metrics.listening_metrics(silence, silence) == {"rhythm": 1.0, "chroma": 1.0}
