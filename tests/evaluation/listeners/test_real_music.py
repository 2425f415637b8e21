"""The listeners on real music: Debian's asc-music soundtrack (three MP3s), fetched with apt-get download and
decoded by the project's reader (PyAV). Each check scores a 4 s continuation after 4 s of context.

The package is cached in REPO/.cache/real_music (git-ignored); a machine without apt skips, CI fails instead."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the listeners' packages: pip install -r requirements-listeners.txt")

from music_continuation.codec import SAMPLE_RATE  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
CACHE = ROOT / ".cache" / "real_music"
PACKAGE = "asc-music"
MUSIC = Path("usr/share/games/asc/music")
BEFORE, AFTER = 4.0, 4.0           # seconds of context and of continuation
START = 60.0                       # seconds into each track

pytestmark = pytest.mark.slow      # librosa's beat tracker compiles with numba on first import (~5-15 s)


def fetch_package() -> Path:
    root = CACHE / "root"
    if not (root / MUSIC).is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["apt-get", "download", PACKAGE], cwd=CACHE, check=True, capture_output=True, timeout=300)
            deb = next(CACHE.glob(f"{PACKAGE}_*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, capture_output=True, timeout=300)
        except (OSError, subprocess.SubprocessError, StopIteration) as error:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"cannot fetch the Debian package {PACKAGE}: {error}")
    return root / MUSIC


@pytest.fixture(scope="module")
def tracks() -> dict:
    """{name: mono float32 numpy at SAMPLE_RATE} of START .. START + 12 s of each track (decoded once, cached)."""
    from music_continuation.data.audio_io import load_audio
    folder = fetch_package()
    excerpts = {}
    for path in sorted(folder.glob("*.mp3")):
        cached = CACHE / f"{path.stem}.npy"
        if not cached.exists():
            audio = load_audio(path)[0].numpy()
            np.save(cached, audio[int(START * SAMPLE_RATE): int((START + 12) * SAMPLE_RATE)])
        excerpts[path.stem] = np.load(cached)
    return excerpts


@pytest.fixture(scope="module")
def listeners():
    from music_continuation.codec import load_codec
    from music_continuation.evaluation.listeners import Listeners
    return Listeners(load_codec("random"), "librosa")


def variants(tracks: dict, name: str) -> tuple[np.ndarray, np.ndarray, dict]:
    import librosa
    x = tracks[name]
    before, after = x[: int(BEFORE * SAMPLE_RATE)], x[int(BEFORE * SAMPLE_RATE): int((BEFORE + AFTER) * SAMPLE_RATE)]
    other = next(k for k in sorted(tracks) if k != name)
    rng = np.random.default_rng(0)
    endings = {
        "identical": after,
        "transposed": librosa.effects.pitch_shift(after, sr=SAMPLE_RATE, n_steps=2),
        "stretched": librosa.effects.time_stretch(after, rate=1.1)[: len(after)],
        "other_track": tracks[other][-len(after):],
        "noise": (rng.standard_normal(len(after)) * after.std()).astype(np.float32),
        "silence": np.zeros_like(after)}
    return before, after, {k: librosa.util.fix_length(v, size=len(after)) for k, v in endings.items()}


def score(listeners, before, after, endings: dict) -> dict:
    def batch(signals):
        return torch.from_numpy(np.stack(signals)).float()[:, None]
    names = list(endings)
    sums = listeners.batch_sums(batch([endings[n] for n in names]), batch([before] * len(names)),
                                batch([after] * len(names)))
    assert sums["listener_examples"] == len(names)
    figures = {}
    heard = listeners._transcribe(batch([endings[n] for n in names]))
    real = listeners._transcribe(batch([after] * len(names)))
    from music_continuation.evaluation.listeners import beat_f1, melody_f1
    beats = listeners._beats(batch([before] * len(names)), batch([endings[n] for n in names]))
    real_beats = listeners._beats(batch([before] * len(names)), batch([after] * len(names)))
    for i, n in enumerate(names):
        figures[n] = {"melody_f1": melody_f1(heard[i].notes, real[i].notes),
                      "beat_f1": beat_f1(beats[i], real_beats[i])}
    return figures


@pytest.mark.parametrize("name", ["frontiers", "time_to_strike", "machine_wars"])
def test_listeners_rank_real_music_variants(tracks, listeners, name):
    before, after, endings = variants(tracks, name)
    figures = score(listeners, before, after, endings)
    print(name, {k: {f: round(v, 3) for f, v in fig.items()} for k, fig in figures.items()})
    assert figures["identical"] == {"melody_f1": 1.0, "beat_f1": 1.0}
    assert figures["transposed"]["melody_f1"] < 0.2                    # notes moved by 200 cents
    assert figures["transposed"]["beat_f1"] >= 0.8                     # same beats
    assert figures["stretched"]["beat_f1"] <= 0.75                     # 10% faster: beats drift off ±70 ms
    for ending in ("noise", "silence"):
        assert figures[ending]["melody_f1"] <= 0.1 and figures[ending]["beat_f1"] <= 0.25, ending
    assert figures["other_track"]["melody_f1"] < 0.5 and figures["other_track"]["beat_f1"] < 1.0


def test_frechet_on_real_music_is_zero_for_identical_sets_and_grows_with_noise(tracks):
    from music_continuation.codec import load_codec
    from music_continuation.evaluation.listeners import frechet
    codec = load_codec("random")
    audio = torch.from_numpy(np.stack([t[: 2 * SAMPLE_RATE] for t in tracks.values()]))[:, None]   # 450 frames
    noise = torch.randn(audio.shape, generator=torch.Generator().manual_seed(0)) * audio.std()
    sets = [frechet.frame_stats(frechet.embed(codec, audio + level * noise)) for level in (0.0, 0.05, 0.5)]
    assert frechet.frechet_distance(sets[0], sets[0]) <= 1e-9 * float(frechet.gaussian(sets[0])[2].trace())
    assert 0 < frechet.frechet_distance(sets[0], sets[1]) < frechet.frechet_distance(sets[0], sets[2])
