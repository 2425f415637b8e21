"""Seconds of CPU work per minute of scored audio for each listener (melody, beat librosa/madmom, Fréchet).

    python bench/bench_listeners.py [--seconds 2] [--examples 16] [--repeats 3] [--threads 1]

Scores `examples` continuations of `seconds` each (the demo's 2 s windows) after as much context, on a synthetic
mix, with torch and onnxruntime on `threads` threads. Each listener is warmed up once first (librosa's numba
compile, model loading: a one-off cost per process, printed separately). Medians over repeats.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from music_continuation.codec import SAMPLE_RATE, load_codec
from music_continuation.evaluation.listeners import beat, frechet, melody


def mix(count: int, seconds: float) -> torch.Tensor:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    clicks = (np.sin(2 * np.pi * 2 * t) > 0.99).astype(np.float32)
    return torch.from_numpy(np.stack([0.2 * np.sin(2 * np.pi * 220 * (1 + i / 12) * t) + 0.3 * clicks
                                      + 0.01 * rng.standard_normal(len(t)) for i in range(count)]).astype(np.float32))


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    audio, before = mix(args.examples, args.seconds), mix(args.examples, args.seconds)
    minutes = args.examples * args.seconds / 60
    start = time.perf_counter()
    transcriber = melody.Transcriber()
    transcriber.session.get_session_options().intra_op_num_threads = args.threads
    codec = load_codec("random")
    trackers = {"librosa": beat.BeatTracker("librosa")}
    try:
        trackers["madmom"] = beat.BeatTracker("madmom")
    except Exception as error:  # noqa: BLE001 - optional tracker
        print(f"madmom: not measured ({error})")
    jobs = {"melody (basic-pitch ONNX)": lambda: transcriber(audio),
            "frechet (codec encoder)": lambda: frechet.frame_stats(frechet.embed(codec, audio[:, None]))}
    for name, tracker in trackers.items():
        jobs[f"beat ({name}, on context + continuation)"] = (
            lambda tracker=tracker: [beat.beats_after_seam(tracker, b, a)
                                     for b, a in zip(before.numpy(), audio.numpy())])
    for job in jobs.values():
        job()                                                # warm-up: numba compile, ONNX session, first call
    print(f"load + warm-up of every listener: {time.perf_counter() - start:.1f} s (once per process)")
    print(f"{args.examples} continuations of {args.seconds:g} s ({minutes:.2f} min), {args.threads} thread(s):")
    for name, job in jobs.items():
        seconds = timed(job, args.repeats)
        print(f"  {name:<42} {seconds / minutes:7.2f} s per minute of scored audio")


if __name__ == "__main__":
    main()
