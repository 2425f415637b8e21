"""The listeners against independent references: mir_eval for notes, frames and beats, scipy for the Fréchet
distance; silence and missing packages give defined figures and one-line errors.

Cost: one basic-pitch session for the whole test session (conftest.transcriber) and the written melody transcribed
once (`written`); the batching check uses 2 s excerpts. What still takes more than ~2 s on an idle 2-core machine
is marked slow: the codec Fréchet check, which builds the codec and runs its encoder. Measured on the shared
2-core machine at load average ~25 (no idle figure could be taken): 14.4 s for the 8 fast tests, 6.1 s of it the
shared set-up (onnxruntime session and the one transcription)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the listeners' packages: pip install -r requirements-listeners.txt")

from music_continuation.codec import LATENT_DIM, SAMPLE_RATE  # noqa: E402
from music_continuation.evaluation.listeners import frechet, melody, packages  # noqa: E402

# A melody written as notes: (onset s, offset s, MIDI pitch), rendered as decaying harmonic tones.
WRITTEN = [(0.1, 0.5, 60), (0.5, 0.9, 64), (0.9, 1.3, 67), (1.3, 1.9, 72), (2.0, 2.4, 62), (2.4, 2.8, 65),
           (2.8, 3.5, 69)]


def render(notes, seconds: float = 4.0) -> torch.Tensor:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    x = np.zeros_like(t)
    for start, end, pitch in notes:
        n = np.arange(int((end - start) * SAMPLE_RATE)) / SAMPLE_RATE
        f = melody.midi_to_hz(pitch)
        tone = sum(np.sin(2 * np.pi * f * k * n) / k for k in (1, 2, 3, 4)) * np.exp(-3 * n)
        tone *= np.minimum(1, n / 0.005) * np.minimum(1, (end - start - n) / 0.02)   # no clicks
        first = int(start * SAMPLE_RATE)
        sounding = x[first: first + len(tone)]             # a note past the end is cut there
        sounding += 0.2 * tone[: len(sounding)]
    return torch.from_numpy(x.astype(np.float32))


@pytest.fixture(scope="module")
def written(transcriber):
    """The written melody's transcription, made once for the tests that read it."""
    return transcriber(render(WRITTEN)[None])[0]


def test_written_notes_are_recovered_within_mir_eval_tolerances(written):
    import mir_eval
    heard = written
    ref_intervals = np.array([[s, e] for s, e, _ in WRITTEN])
    est_intervals = np.array([[s, max(e, s + 1e-3)] for s, e, _ in heard.notes])
    precision, recall, f_measure, _ = mir_eval.transcription.precision_recall_f1_overlap(
        ref_intervals, melody.midi_to_hz([p for *_, p in WRITTEN]), est_intervals,
        melody.midi_to_hz([p for *_, p in heard.notes]), onset_tolerance=0.05, pitch_tolerance=50.0,
        offset_ratio=None)
    assert recall == 1.0                                   # every written note, onset ±50 ms, pitch ±50 cents
    assert f_measure > 0.75                                # a harmonic heard as an extra note at most now and then
    assert melody.melody_f1(heard.notes, WRITTEN) == pytest.approx(f_measure)
    transposed = [(s, e, p + 2) for s, e, p in WRITTEN]
    assert melody.melody_f1(heard.notes, transposed) < 0.2   # 200 cents is far outside ±50


def test_batching_gives_each_example_its_own_transcription(transcriber):
    """Windows of a whole batch go through the model together; each example gets back exactly its own."""
    a, b = render(WRITTEN, seconds=2.0), render([(s, e, p - 5) for s, e, p in WRITTEN], seconds=2.0)
    together = transcriber(torch.stack([a, b, torch.zeros_like(a)]))
    alone = transcriber(b[None])[0]
    np.testing.assert_allclose(together[1].note, alone.note, atol=1e-5)
    assert together[1].notes == alone.notes and together[2].notes == []


def test_pitch_class_agreement_is_mir_eval_multipitch_accuracy_on_pitch_class_sets(transcriber, written):
    import mir_eval
    a = written.note
    b = transcriber(render([(s, e, p + 7 if i % 2 else p) for i, (s, e, p) in enumerate(WRITTEN)])[None])[0].note
    ours = melody.pitch_class_agreement(a, b)

    def frames(note):                                       # the sounding pitch classes as one-octave frequencies
        classes = melody.pitch_classes(note)
        return [melody.midi_to_hz(60 + np.flatnonzero(row)) for row in classes]
    times = np.arange(len(a)) / 86.0
    scores = mir_eval.multipitch.evaluate(times, frames(a), times, frames(b))
    assert 0.0 < ours < 1.0
    assert ours == pytest.approx(scores["Accuracy"], abs=1e-9)
    assert melody.pitch_class_agreement(a, a) == 1.0


def test_silence_and_pitchless_references_give_defined_figures(transcriber, written):
    from music_continuation.evaluation.listeners.beat import beat_f1, tempo_ratio
    silence = transcriber(torch.zeros(1, SAMPLE_RATE))[0]
    music = written
    assert silence.notes == []
    assert melody.melody_f1([], []) == 1.0 and melody.pitch_class_agreement(silence.note, silence.note) == 1.0
    assert melody.melody_f1(music.notes, silence.notes) == 0.0
    assert melody.pitch_class_agreement(music.note, silence.note) == 0.0
    assert beat_f1(np.array([]), np.array([])) == 1.0 and beat_f1(np.array([0.5, 1.0]), np.array([])) == 0.0
    assert tempo_ratio(np.array([0.5]), np.array([0.5, 1.0])) is None
    assert tempo_ratio(np.array([0.0, 0.25, 0.5]), np.array([0.0, 0.5, 1.0])) == 2.0   # twice as fast


def test_beat_f1_is_mir_eval_with_its_70_ms_window():
    from music_continuation.evaluation.listeners.beat import beat_f1
    reference = np.arange(0.0, 4.0, 0.5)
    assert beat_f1(reference + 0.06, reference) == 1.0
    assert beat_f1(reference + 0.08, reference) == 0.0
    assert beat_f1(reference[::2], reference) == pytest.approx(2 * 0.5 / 1.5)   # P 1, R 0.5


def gaussian_frames(count: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(LATENT_DIM, LATENT_DIM, generator=generator, dtype=torch.float64) / LATENT_DIM ** 0.5
    return torch.randn(count, LATENT_DIM, generator=generator, dtype=torch.float64) @ mixing + shift


def test_frechet_distance_matches_the_scipy_sqrtm_formula():
    from scipy import linalg
    a, b = gaussian_frames(1000, 0), gaussian_frames(800, 1, shift=0.3)
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    s_a, s_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    root = linalg.sqrtm(s_a @ s_b).real                   # as pytorch-fid / fadtk compute it
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root)
    ours = frechet.frechet_distance(frechet.frame_stats(a), frechet.frame_stats(b))
    assert ours == pytest.approx(expected, rel=1e-6)
    halves = frechet.frame_stats(a[:400]) + frechet.frame_stats(a[400:])   # sums add across batches and ranks
    assert frechet.frechet_distance(halves, frechet.frame_stats(b)) == pytest.approx(ours, rel=1e-9)


@pytest.mark.slow      # builds the codec and runs its encoder: 5.4 s measured at load average 23 on 2 cores
def test_frechet_is_zero_for_identical_sets_grows_with_noise_and_refuses_too_few_frames():
    from music_continuation.codec import load_codec
    codec = load_codec("random")
    audio = render(WRITTEN)[: 2 * SAMPLE_RATE].reshape(2, 1, -1)           # 2 examples of 1 s: 150 frames
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(audio.shape, generator=generator)
    levels = (0.003, 0.03, 0.3)
    frames = frechet.embed(codec, torch.cat([audio] + [audio + level * noise for level in levels]))
    sets = [frechet.frame_stats(part) for part in frames.split(2 * 75)]      # one encoder call, four sets
    clean = sets[0]
    scale = float(frechet.gaussian(clean)[2].trace())
    assert frechet.frechet_distance(clean, clean) <= 1e-9 * scale            # float64 rounding only
    distances = [frechet.frechet_distance(clean, noisy) for noisy in sets[1:]]
    assert distances[0] < distances[1] < distances[2]
    few = frechet.frame_stats(frames[:75])                                    # one example: 75 frames
    with pytest.raises(frechet.FrechetError, match=r"refused, 75 codec frames .* at least 129"):
        frechet.frechet_distance(few, clean)


def test_a_missing_package_is_one_line_naming_it_and_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)       # import onnxruntime now raises ImportError
    with pytest.raises(packages.ListenerUnavailable) as error:
        melody.Transcriber()
    message = str(error.value)
    assert "\n" not in message and "onnxruntime" in message and packages.INSTALL_COMMAND in message


def test_evaluate_cli_names_a_missing_listener_package_in_one_line(monkeypatch, capsys, tmp_path):
    from music_continuation.evaluation import evaluate
    monkeypatch.setitem(sys.modules, "basic_pitch", None)
    assert evaluate.main(["--checkpoint", str(tmp_path / "any.pt")]) == 2    # checked before the checkpoint
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "basic-pitch" in err
