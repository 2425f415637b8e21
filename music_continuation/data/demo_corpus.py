"""A deterministic synthetic music corpus, so the whole pipeline runs anywhere with no data.

Every track has a drum pattern (kick / snare / hi-hat) at its own tempo, a bass line following a
four-chord progression and a repeating melodic motif from a scale in its own key, played by one of a
few timbres (additive harmonics with per-partial decay, FM, organ). Motifs repeat bar after bar,
transposed along the chord progression, so the next bars are predictable from the previous ones:
something with rhythm and melody for the continuation task to learn.

Everything is drawn from numpy generators seeded with (seed, track index): the same arguments give
bit-identical files on every machine. Files are written as real audio in mixed formats and sample
rates (24 kHz WAV, 44.1 kHz stereo WAV, 24 kHz FLAC, 48 kHz stereo WAV) so that preparing the demo
goes through the same reading and resampling path as real music.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile

from music_continuation.utils import atomic_path, write_json

DEFAULT_NUM_TRACKS = 24
DEFAULT_SECONDS = 12.0
SETTINGS_FILE = ".demo_corpus.json"   # hidden: prepare_data.py ignores dot-files
GENERATOR_VERSION = 1                 # bump when the synthesis changes, so old corpora are regenerated

NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
SCALES = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
}
PROGRESSIONS = ((0, 5, 3, 4), (0, 3, 4, 0), (0, 4, 5, 3), (5, 3, 0, 4), (0, 3, 0, 4))   # scale degrees, one per bar
KICK_PATTERNS = ((0, 8), (0, 6, 8), (0, 7, 10), (0, 3, 8, 11), (0, 8, 10))               # 16th steps within a bar
SNARE_PATTERNS = ((4, 12), (4, 12, 15), (4, 12, 14))
BASS_PATTERNS = (  # (step, length in steps, semitone offset from the chord root)
    ((0, 3, 0), (4, 2, 0), (8, 3, 0), (12, 2, 12)),
    ((0, 4, 0), (6, 2, 7), (8, 4, 0), (14, 2, 7)),
    ((0, 2, 0), (3, 1, 0), (6, 2, 12), (8, 2, 0), (11, 1, 0), (14, 2, 7)),
    ((0, 7, 0), (8, 7, 0)),
)
FILE_FORMATS = (  # cycled over tracks: (extension, soundfile format, subtype, sample rate, channels)
    ("wav", "WAV", "PCM_16", 24_000, 1),
    ("wav", "WAV", "PCM_16", 44_100, 2),
    ("flac", "FLAC", "PCM_16", 24_000, 1),
    ("wav", "WAV", "PCM_16", 48_000, 2),
)


@dataclass(frozen=True)
class TrackPlan:
    """The musical choices of one track (also written to the corpus' settings file for reference)."""
    index: int
    bpm: float
    key: int               # 0 = C
    scale: str
    progression: tuple
    kick: tuple
    snare: tuple
    hat_sixteenths: bool
    bass_pattern: int
    bass_timbre: str
    lead_timbre: str

    @property
    def name(self) -> str:
        return f"demo_{self.index:03d}_{NOTE_NAMES[self.key]}-{self.scale}_{round(self.bpm)}bpm"


def plan_track(index: int, seed: int) -> TrackPlan:
    rng = np.random.default_rng([seed, index, 0])
    return TrackPlan(
        index=index,
        bpm=float(rng.uniform(84, 140)),
        key=int(rng.integers(12)),
        scale=str(rng.choice(list(SCALES))),
        progression=PROGRESSIONS[rng.integers(len(PROGRESSIONS))],
        kick=KICK_PATTERNS[rng.integers(len(KICK_PATTERNS))],
        snare=SNARE_PATTERNS[rng.integers(len(SNARE_PATTERNS))],
        hat_sixteenths=bool(rng.random() < 0.5),
        bass_pattern=int(rng.integers(len(BASS_PATTERNS))),
        bass_timbre=str(rng.choice(["saw", "fm"])),
        lead_timbre=str(rng.choice(["bell", "organ", "pluck", "fm_piano"])),
    )


# ------------------------------------------------------------------------------------------ sounds

def midi_to_hz(note: float) -> float:
    return 440.0 * 2.0 ** ((note - 69) / 12)


def _envelope(n: int, rate: int, attack: float, decay: float) -> np.ndarray:
    """Linear attack then exponential decay exp(-t / decay); a 5 ms release at the end avoids clicks."""
    t = np.arange(n) / rate
    env = np.minimum(t / max(attack, 1e-4), 1.0) * np.exp(-t / decay)
    release = min(n, int(0.005 * rate))
    if release:
        env[-release:] *= np.linspace(1.0, 0.0, release)
    return env


def kick(rate: int, rng) -> np.ndarray:
    n = int(0.35 * rate)
    t = np.arange(n) / rate
    freq = 45 + 95 * np.exp(-t / 0.035)                   # the pitch drop that makes a kick
    body = np.sin(2 * np.pi * np.cumsum(freq) / rate) * np.exp(-t / 0.13)
    clicks = int(0.02 * rate)                             # the beater's click: 20 ms of decaying noise
    body[:clicks] += rng.standard_normal(clicks) * np.exp(-t[:clicks] / 0.003) * 0.3
    return body


def snare(rate: int, rng) -> np.ndarray:
    n = int(0.25 * rate)
    t = np.arange(n) / rate
    noise = np.diff(rng.standard_normal(n + 1)) * 0.22 * np.exp(-t / 0.05)   # diff: a crude high-pass
    tone = np.sin(2 * np.pi * 185 * t) * np.exp(-t / 0.04)
    return noise + 0.6 * tone


def hat(rate: int, rng, open_hat: bool = False) -> np.ndarray:
    n = int((0.2 if open_hat else 0.05) * rate)
    t = np.arange(n) / rate
    noise = np.diff(np.diff(rng.standard_normal(n + 2))) * 0.35
    return noise * np.exp(-t / (0.07 if open_hat else 0.012))


def additive(freq: float, seconds: float, rate: int, amplitudes, decays, attack: float = 0.005) -> np.ndarray:
    """sum_k a_k sin(2 pi k f t) exp(-t / d_k): partials above 0.45 * rate are dropped (no aliasing)."""
    n = max(1, int(seconds * rate))
    t = np.arange(n) / rate
    out = np.zeros(n)
    for k, (amp, decay) in enumerate(zip(amplitudes, decays), start=1):
        if k * freq < 0.45 * rate:
            out += amp * np.sin(2 * np.pi * k * freq * t) * np.exp(-t / decay)
    return out * _envelope(n, rate, attack, 1e9)


def fm(freq: float, seconds: float, rate: int, ratio: float, index: float, decay: float,
       index_decay: float) -> np.ndarray:
    """Two-operator FM: sin(2 pi f t + I exp(-t / d_I) sin(2 pi r f t)) with an exponential envelope."""
    n = max(1, int(seconds * rate))
    t = np.arange(n) / rate
    modulator = index * np.exp(-t / index_decay) * np.sin(2 * np.pi * ratio * freq * t)
    return np.sin(2 * np.pi * freq * t + modulator) * _envelope(n, rate, 0.003, decay)


@functools.lru_cache(maxsize=512)   # motifs and bass lines repeat: each distinct note is synthesised once
def instrument(timbre: str, freq: float, seconds: float, rate: int) -> np.ndarray:
    """One note of `timbre` (read-only: the cached array is shared by every repetition of the note)."""
    sound = _synthesise(timbre, freq, seconds, rate)
    sound.setflags(write=False)
    return sound


def _synthesise(timbre: str, freq: float, seconds: float, rate: int) -> np.ndarray:
    harmonics = np.arange(1, 13)
    if timbre == "saw":        # bass: bright saw-like partials 1/k that darken quickly
        return additive(freq, seconds, rate, 1.0 / harmonics, 0.5 / harmonics ** 0.7)
    if timbre == "fm":         # bass: FM with ratio 1 (all harmonics), index falling over the note
        return fm(freq, seconds, rate, ratio=1.0, index=2.5, decay=0.5, index_decay=0.15)
    if timbre == "bell":       # inharmonic-free bell-ish: few partials with long decays
        return additive(freq, seconds, rate, (1.0, 0.0, 0.5, 0.0, 0.25, 0.0, 0.12), (1.2, 1, 0.6, 1, 0.3, 1, 0.2))
    if timbre == "organ":      # sustained odd-and-even partials, no decay
        return additive(freq, seconds, rate, (1.0, 0.6, 0.3, 0.2, 0.1), (1e9,) * 5, attack=0.02)
    if timbre == "pluck":      # plucked string: bright start, upper partials die fast
        return additive(freq, seconds, rate, 0.8 / harmonics, 0.35 / harmonics)
    if timbre == "fm_piano":   # electric-piano-like FM: ratio 1 with a fast-decaying index
        return fm(freq, seconds, rate, ratio=1.0, index=1.8, decay=0.6, index_decay=0.08)
    raise ValueError(f"unknown timbre {timbre!r}")


# ------------------------------------------------------------------------------------------ score

def _place(buffer: np.ndarray, sound: np.ndarray, start: int, gain: float) -> None:
    stop = min(len(buffer), start + len(sound))
    if start < stop:
        buffer[start:stop] += gain * sound[: stop - start]


def _scale_note(plan: TrackPlan, degree: int, base_octave_note: int) -> int:
    """MIDI note of a scale degree (any integer: degrees wrap into higher/lower octaves)."""
    scale = SCALES[plan.scale]
    octave, step = divmod(degree, len(scale))
    return base_octave_note + plan.key + 12 * octave + scale[step]


def _motif(rng, steps_per_bar: int = 16) -> list[tuple[int, int, int]]:
    """One bar of melody: (step, length, scale degree) with a random-walk contour, long notes on beats."""
    notes, step, degree = [], 0, int(rng.integers(0, 5))
    while step < steps_per_bar:
        length = int(rng.choice([2, 2, 4, 1, 3] if step % 4 else [4, 2, 3, 6]))
        length = min(length, steps_per_bar - step)
        if rng.random() < 0.85:                       # a few rests keep the line breathing
            notes.append((step, length, degree))
        degree = int(np.clip(degree + rng.choice([-2, -1, -1, 1, 1, 2, 0, 3]), -2, 9))
        step += length
    return notes


def render_track(plan: TrackPlan, seconds: float, rate: int, seed: int) -> np.ndarray:
    """The track as float [N, 2] (stereo stems panned), peak-normalised, at `rate` Hz."""
    rng = np.random.default_rng([seed, plan.index, 1])
    n = int(round(seconds * rate))
    step_seconds = 60.0 / plan.bpm / 4
    total_steps = int(np.ceil(seconds / step_seconds))
    drums, bass, lead = np.zeros(n), np.zeros(n), np.zeros(n)
    motifs = (_motif(rng), _motif(rng))              # bars alternate motif A / motif B
    hat_steps = range(0, 16, 1 if plan.hat_sixteenths else 2)

    for bar in range(int(np.ceil(total_steps / 16))):
        bar_start = bar * 16
        chord = plan.progression[bar % len(plan.progression)]
        fill = bar % 4 == 3                          # every fourth bar the drums add a fill
        for step in range(16):
            at = int(round((bar_start + step) * step_seconds * rate))
            if step in plan.kick or (fill and step == 14):
                _place(drums, kick(rate, rng), at, 0.9)
            if step in plan.snare or (fill and step in (13, 15)):
                _place(drums, snare(rate, rng), at, 0.45 + 0.1 * rng.random())
            if step in hat_steps:
                accent = 1.0 if step % 4 == 0 else 0.6
                _place(drums, hat(rate, rng, open_hat=step == 14 and not fill), at, 0.25 * accent)
        for step, length, offset in BASS_PATTERNS[plan.bass_pattern]:
            note = _scale_note(plan, chord, 36) + offset
            sound = instrument(plan.bass_timbre, midi_to_hz(note), length * step_seconds, rate)
            _place(bass, sound, int(round((bar_start + step) * step_seconds * rate)), 0.5)
        for step, length, degree in motifs[bar % 2]:
            note = _scale_note(plan, degree + chord, 60)
            sound = instrument(plan.lead_timbre, midi_to_hz(note), length * step_seconds * 1.1, rate)
            _place(lead, sound, int(round((bar_start + step) * step_seconds * rate)), 0.3)

    pans = {"drums": 0.5, "bass": 0.5, "lead": float(rng.uniform(0.3, 0.7))}   # 0 = left, 1 = right
    stereo = np.zeros((n, 2))
    for stem, pan in ((drums, pans["drums"]), (bass, pans["bass"]), (lead, pans["lead"])):
        stereo[:, 0] += stem * np.cos(pan * np.pi / 2)
        stereo[:, 1] += stem * np.sin(pan * np.pi / 2)
    fade = min(n, int(0.01 * rate))
    stereo[:fade] *= np.linspace(0, 1, fade)[:, None]
    stereo[n - fade:] *= np.linspace(1, 0, fade)[:, None]
    peak = np.abs(stereo).max()
    return stereo * (float(rng.uniform(0.7, 0.95)) / peak if peak > 0 else 1.0)


# ------------------------------------------------------------------------------------------ files

def corpus_files(num_tracks: int, seed: int) -> list[tuple[TrackPlan, tuple]]:
    plans = [plan_track(i, seed) for i in range(num_tracks)]
    return [(plan, FILE_FORMATS[plan.index % len(FILE_FORMATS)]) for plan in plans]


def write_corpus(audio_dir, num_tracks: int = DEFAULT_NUM_TRACKS, seconds: float = DEFAULT_SECONDS,
                 seed: int = 0) -> list[Path]:
    """Write the corpus into audio_dir; returns the file paths.

    If audio_dir already holds the corpus for these arguments nothing is rewritten (so a prepared
    cache stays valid: prepare_data.py recognises unchanged files by size and mtime). Other
    arguments regenerate it, removing demo files that no longer belong.
    """
    if num_tracks < 1 or seconds <= 0:
        raise ValueError(f"demo corpus needs num_tracks >= 1 and seconds > 0, got {num_tracks}, {seconds}")
    audio_dir = Path(audio_dir)
    audio_dir.mkdir(parents=True, exist_ok=True)
    settings = {"generator_version": GENERATOR_VERSION, "num_tracks": num_tracks, "seconds": seconds, "seed": seed}
    settings_path = audio_dir / SETTINGS_FILE
    files = corpus_files(num_tracks, seed)
    paths = [audio_dir / f"{plan.name}.{fmt[0]}" for plan, fmt in files]
    try:
        unchanged = json.loads(settings_path.read_text()).get("settings") == settings
    except (OSError, ValueError):
        unchanged = False
    if unchanged and all(path.is_file() for path in paths):
        return paths

    for old in audio_dir.glob("demo_*"):
        if old not in paths:
            old.unlink()
    for (plan, (_, fmt, subtype, rate, channels)), path in zip(files, paths):
        audio = render_track(plan, seconds, rate, seed)
        audio = audio if channels == 2 else audio.mean(axis=1)
        with atomic_path(path) as tmp_path:                       # hidden, then renamed: never half-written
            soundfile.write(tmp_path, audio.astype(np.float32), rate, format=fmt, subtype=subtype)
    record = {"settings": settings, "tracks": [{"file": p.name, **asdict(plan)} for (plan, _), p in zip(files, paths)]}
    write_json(settings_path, record)
    return paths


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="write the synthetic demo corpus (audio files only)")
    parser.add_argument("out_dir")
    parser.add_argument("--num_tracks", type=int, default=DEFAULT_NUM_TRACKS)
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for written in write_corpus(args.out_dir, args.num_tracks, args.seconds, args.seed):
        print(written)
