"""Score a checkpoint against the silence, repeat and oracle baselines on a cache split.

    python evaluate.py --checkpoint runs/x/best.pt [--data_dir CACHE] [--split val] [--max_windows N] \
        [--out scores.json] [--device cpu] [--batch_size 8] [--target_audio auto|original|codec] [--no_musical] \
        [--no_listeners] [--beat_tracker librosa|madmom]

Windows are evenly spaced over the split (first and last included; all of them without --max_windows),
the same for every checkpoint on the same cache and segment length. Prints a table (rows model,
silence, repeat, oracle, skill; columns evaluation.SCORE_NAMES) and with --out writes the same figures
as JSON. Figures and baselines are defined in scoring.py.

Exit status 0, or 2 with one line `error: ...` when a flag, the checkpoint, the codec or the cache is unusable,
or a package the listeners need is missing (the line names it and the install command).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from music_continuation.evaluation.listeners import BEAT_TRACKERS, ListenerUnavailable
from music_continuation.evaluation.scoring import TARGET_AUDIO_CHOICES, evaluate_checkpoint, format_table
from music_continuation.training.checkpoint import WEIGHT_CHOICES
from music_continuation.utils import OneLineParser, one_line, run_command, write_json


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (best.pt / latest.pt)")
    parser.add_argument("--data_dir", default=None, help="the cache (default: the checkpoint's --data_dir)")
    parser.add_argument("--references_dir", default=None,
                        help="where the training run decoded its references (default: the checkpoint's "
                             "--references_dir, else DATA_DIR/references, else the per-user folder); read only")
    parser.add_argument("--split", default="val", choices=("train", "val"))
    parser.add_argument("--max_windows", type=int, default=None, help="evenly spaced windows (default: all)")
    parser.add_argument("--out", default=None, help="write the figures as JSON to this file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--target_audio", default=None, choices=TARGET_AUDIO_CHOICES,
                        help="audio to score against (default: the checkpoint's --target_audio, else auto)")
    parser.add_argument("--no_musical", action="store_true", help="skip rhythm and chroma (faster)")
    parser.add_argument("--no_listeners", action="store_true",
                        help="skip the pretrained listeners: melody_f1, pitch_class_agreement, beat_f1, tempo_ratio, "
                             "frechet_codec (docs/musical-figures.md)")
    parser.add_argument("--beat_tracker", default="librosa", choices=BEAT_TRACKERS,
                        help="beat tracker of beat_f1 and tempo_ratio (madmom: CC BY-NC-SA 4.0 models)")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto",
                        help="which weights to run: 'auto' the EMA average when the checkpoint has one (trained "
                             "with --ema_decay), else the raw ones; 'ema'; 'raw' the training weights")
    return parser


def check_flags(parser: argparse.ArgumentParser, args) -> None:
    if args.max_windows is not None and args.max_windows < 1:
        parser.error(f"--max_windows must be at least 1, got {args.max_windows}")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as error:
        parser.error(f"--device {args.device}: {one_line(error)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")


def run(args) -> int:
    result = evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir, split=args.split,
                                 max_windows=args.max_windows, device=args.device, batch_size=args.batch_size,
                                 musical=not args.no_musical, target_audio=args.target_audio,
                                 listeners=not args.no_listeners, beat_tracker=args.beat_tracker,
                                 references_dir=args.references_dir, weights=args.weights)
    weights = ", ".join(f"{name} {value:g}" for name, value in result["weights"].items())
    print(f"{result['checkpoint']} (epoch {result['epoch']}, {result['weights_used']} weights) "
          f"on {result['windows']} {result['split']} windows of "
          f"{result['data_dir']}; target audio: {result['target_audio']}; loss weights: {weights}")
    print(format_table(result))
    print("skill = (repeat - model) / (repeat - oracle): 1 = as good as the oracle, 0 = no better than "
          "repeating the context, < 0 = worse")
    if not args.no_listeners:
        print("frechet_codec is a Fréchet distance between sets of EnCodec frames, not comparable to VGGish FAD; "
              "tempo_ratio is best at 1")
    if args.out:
        write_json(Path(args.out), result)
        print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    from music_continuation.codec import CodecLoadError
    from music_continuation.data.cache import CacheError
    from music_continuation.training.checkpoint import CheckpointError

    return run_command(build_parser(), check_flags, run, argv,
                       (CheckpointError, CodecLoadError, CacheError, ValueError, OSError, ListenerUnavailable))


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
