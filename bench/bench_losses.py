"""Time forward+backward of this project's MR-STFT + mel losses against auraloss on the same batch.

    python bench/bench_losses.py [--batch 8] [--seconds 2.0] [--runs 7] [--warmup 2]

Both sides do the same job: a prediction that requires grad, a reference that does not, three STFT
resolutions (512/128, 1024/256, 2048/512, window = FFT size, periodic Hann, centred, reflect
padding) plus an 80-band mel loss at 1024/256. Prints human-readable lines, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from music_continuation.codec import SAMPLE_RATE
from music_continuation.losses.audio import CombinedLoss

FFT_SIZES, HOP_SIZES = (512, 1024, 2048), (128, 256, 512)


def ours():
    loss = CombinedLoss(rms_input=0.0, rms_target=0.0, spectral=1.0, mel=1.0)

    def step(pred, ref):
        total, _ = loss(pred, ref, ref)
        return total
    return step


def auraloss_reference():
    import auraloss
    mrstft = auraloss.freq.MultiResolutionSTFTLoss(fft_sizes=list(FFT_SIZES), hop_sizes=list(HOP_SIZES),
                                                   win_lengths=list(FFT_SIZES))
    mel = auraloss.freq.MelSTFTLoss(sample_rate=SAMPLE_RATE, fft_size=1024, hop_size=256, win_length=1024, n_mels=80)

    def step(pred, ref):
        return mrstft(pred, ref) + mel(pred, ref)
    return step


def time_step(step, pred, ref, runs: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + runs):
        pred.grad = None
        start = time.perf_counter()
        step(pred, ref).backward()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=7, help="timed runs per implementation (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    generator = torch.Generator().manual_seed(args.seed)
    n = int(args.seconds * SAMPLE_RATE)
    ref = 0.1 * torch.randn(args.batch, 1, n, generator=generator)
    pred = (ref + 0.05 * torch.randn(args.batch, 1, n, generator=generator)).requires_grad_(True)

    implementations = {"ours": ours(), "auraloss": auraloss_reference()}
    times = {name: [] for name in implementations}
    # Interleave the two so that load from other processes hits both alike.
    for _ in range(args.runs):
        for name, step in implementations.items():
            times[name] += time_step(step, pred, ref, runs=1, warmup=args.warmup if not times[name] else 0)
    medians = {name: statistics.median(values) for name, values in times.items()}
    speedup = medians["auraloss"] / medians["ours"]

    print(f"batch {args.batch} x {args.seconds:g} s at {SAMPLE_RATE} Hz, forward+backward of MR-STFT + mel, "
          f"median of {args.runs} runs after {args.warmup} warm-up, {torch.get_num_threads()} threads")
    print(f"  this project: {1000 * medians['ours']:8.1f} ms")
    print(f"  auraloss:     {1000 * medians['auraloss']:8.1f} ms")
    print(f"  speed-up:     {speedup:8.2f}x")
    result = {"batch": args.batch, "seconds": args.seconds, "sample_rate": SAMPLE_RATE, "runs": args.runs,
              "threads": torch.get_num_threads(), "ours_ms": round(1000 * medians["ours"], 2),
              "auraloss_ms": round(1000 * medians["auraloss"], 2), "speedup": round(speedup, 3)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
