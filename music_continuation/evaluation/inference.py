"""Continuations for listening tests: WAVs, spectrograms, objective metrics and a listening page.

    python inference_sample.py --checkpoint runs/x/best.pt --input song.flac other.mp3 --out_dir samples/x \
        [--start 30] [--continue_seconds 8] [--lead_in_seconds 4] [--blind] [--mlflow]
    python inference_sample.py --checkpoint runs/x/best.pt --from_cache data_cache/demo --split val \
        --num_samples 8 --continue_seconds 4 --out_dir samples/x

For each example the context is `segment_frames` latent frames (the model's input window) starting
at --start (rounded to the 13.3 ms latent frame grid) of an input file, or one window of a prepared
cache (--start applies to --input only). Cache windows are spread over the split's tracks (they take
turns) and evenly spaced within each, over the windows that leave room for the whole continuation
and lead-in where a track has such windows. The model predicts the next window; longer
--continue_seconds continue autoregressively, the model reading its own last predicted window each
time. The predicted latents are denormalised and decoded by the frozen EnCodec decoder in one pass
(so there is no seam between windows), then trimmed to --continue_seconds.

Written to OUT_DIR/<example>/, all 24 kHz mono 32-bit float WAV, never normalised (levels compare as
they are):
    lead_in.wav       the REAL audio of the --lead_in_seconds before the context (clipped at the start
                      of the track or file; absent when the context starts there)
    context.wav       the REAL audio of the context window (not the decoded latents)
    continuation.wav  the decoded prediction
    target.wav        what the figures score against, as long as the continuation: the real audio
                      after the context (--target_audio original) or the frozen decoder's audio of its
                      true latents, decoded in one pass from the seam as the prediction is (codec)
    original.wav      the real audio after the context, when the target is the codec's decoding
    player_<ending>.wav   lead_in + context + <ending> (continuation, target, original): the players,
                      all of an example's by one gain (<= 1) that keeps the loudest below full scale
                      (PLAYER_PEAK; a browser clips above it): metrics.json's player_gain
    spectrogram.png   one row per player, one colour scale, the seam marked (plots.plot_continuations)
target.wav and original.wav exist where the real continuation is known: always for a cache (clipped at
the track's end), for a file when it holds at least one segment after the context. OUT_DIR/metrics.json
(per example and mean), OUT_DIR/index.html (the listening page, listening_page.py) and, with --blind,
OUT_DIR/blind_key.json (which of A/B is the model) plus A.wav / B.wav / spectrogram_ab.png per example.

Metrics are scoring.py's figures (scoring.SCORE_NAMES, one definition for validation,
evaluate.py and this page), computed on the FIRST predicted segment: the continuation's first
segment_frames * 320 samples against the target's first segment and the context (an autoregressive
run is scored on that first window too):
    loss, rms_input, rms_target, spectral, mel   losses.CombinedLoss with the checkpoint's loss weights
    latent_mse                             the first predicted window's normalised latents against the
                                           true next window's
    level                                  RMS(output) / RMS(target): 1 is right, 0 is silence
    rhythm, chroma                         listening_metrics.py (definitions there)
Beside the model, where the real continuation is known, the same figures for evaluation.BASELINES:
silence (zeros), repeat (the context's latents decoded as its own continuation) and oracle (the true
next window's latents decoded). A cache holds the true latents; for an input file the audio is
encoded with the codec from the start of the file, as prepare_data.py does. The target is the
checkpoint's --target_audio unless told otherwise. Without a known continuation only the model's
rms_input is computed, and no baselines. The means are the means over examples of each figure
(examples without it left out).

Exit status: 0 when every example was written; 1 when some inputs failed (the others are still
written) or all of them did (then nothing is written); 2 when nothing can run (a missing --input file,
bad checkpoint, codec mismatch, bad cache or flags, or a model whose output is not finite).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import operator
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
import torch

from music_continuation.codec import (
    FRAME_RATE,
    HOP_LENGTH,
    SAMPLE_RATE,
    CodecLoadError,
    FrozenDecoder,
    check_fingerprint,
    codec_fingerprint,
    encode,
    load_codec,
)
from music_continuation.evaluation import scoring as evaluation
from music_continuation.evaluation.listeners import BEAT_TRACKERS, ListenerUnavailable
from music_continuation.evaluation.listening_page import (
    ENDINGS,
    METRIC_NAMES,
    MODEL_ROW,
    TARGET_WHAT,
    ending_title,
    figure_rows,
    format_value,
    player,
    render_page,
)
from music_continuation.evaluation.plots import plot_continuations
from music_continuation.evaluation.scoring import BASELINES, TARGET_AUDIO_CHOICES, EvaluationError, ScoreSums
from music_continuation.losses.audio import CombinedLoss, rms_loss
from music_continuation.utils import (
    OneLineParser,
    UserError,
    atomic_path,
    check_mlflow_server,
    one_line,
    run_command,
    warn,
    write_json,
)

PLAYER_PEAK = 0.99      # the loudest sample of an example's players: just below a player's full scale


class InferenceError(UserError, RuntimeError):
    """Nothing can be generated (bad checkpoint, codec mismatch, bad cache); one-line message."""


@dataclass
class Example:
    """One context to continue. Latents are raw (not normalised); audio is float32 [1, N] on the CPU."""
    name: str
    source: str
    context_latent: torch.Tensor               # [128, T]
    context_audio: torch.Tensor                # [1, T * 320], the real audio of the context window
    lead_in: torch.Tensor                      # [1, L], the real audio before the context (L may be 0)
    original: torch.Tensor | None = None       # [1, M], the real audio after the context (M >= T * 320) or None
    target_latent: torch.Tensor | None = None  # [128, ceil(M / 320)], the true latents of `original`
    target: torch.Tensor | None = None         # [1, M], what the figures score against, by score()
    continuation: torch.Tensor | None = None   # [1, windows * T * 320], filled by generate()
    predicted_latent: torch.Tensor | None = None   # [128, T] normalised first predicted window, by generate()
    metrics: dict = field(default_factory=dict)
    baselines: dict | None = None              # {baseline: figures} where the target is known
    sums: dict | None = None                   # {"model" and each baseline: its ScoreSums}, where scored
    blind: dict | None = None                  # {"A": ending, "B": ending} with --blind (listening_page.ENDINGS)
    player_gain: float = 1.0                   # the players' gain (<= 1), by write_example


@dataclass
class Span:
    """What an example needs of a track or file beyond its context window (lengths in samples)."""
    lead_in: int           # real audio before the context
    after: int             # real audio (and its latents) after the context: the continuation's length


# ------------------------------------------------------------------------------------------- inputs

def safe_name(text: str) -> str:
    """A file-system and URL friendly version of `text`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[:60] or "example"


def load_model(checkpoint: str, device: str, weights: str = "auto"):
    """(model, normalizer, checkpoint dict), any failure as InferenceError naming the file."""
    from music_continuation.training.checkpoint import load_model_for_inference
    try:
        model, normalizer, state = load_model_for_inference(checkpoint, device, weights)
    except Exception as error:  # noqa: BLE001 - CheckpointError, but also torch / device errors
        message = one_line(error)
        if str(checkpoint) not in message:
            message = f"--checkpoint {checkpoint}: {message}"
        raise InferenceError(message) from None
    return model, normalizer, state


def segment_frames_of(state: dict, checkpoint: str) -> int:
    frames = state.get("segment_frames") or (state.get("args") or {}).get("segment_frames")
    if not frames or int(frames) < 1:
        raise InferenceError(f"--checkpoint {checkpoint}: records no segment_frames")
    return int(frames)


def window_example(name: str, source: str, read_latents, read_audio, frames: int, start_frame: int,
                   segment_frames: int, span: Span) -> Example:
    """The example of the context window at `start_frame` of a track of `frames` latent frames.

    read_latents(first, last) -> raw latents [128, last - first] of those frames; read_audio(first, last)
    -> real audio [1, last - first] of those samples (frame f is samples [f * 320, (f + 1) * 320)).
    The original continuation is up to span.after samples, clipped at the track's end, and known only
    when at least one segment follows the context.
    """
    context_start, context_end = start_frame * HOP_LENGTH, (start_frame + segment_frames) * HOP_LENGTH
    after_frames = min(math.ceil(span.after / HOP_LENGTH), frames - start_frame - segment_frames)
    example = Example(name=name, source=source,
                      context_latent=read_latents(start_frame, start_frame + segment_frames),
                      context_audio=read_audio(context_start, context_end),
                      lead_in=read_audio(max(0, context_start - span.lead_in), context_start))
    if after_frames >= segment_frames:
        example.original = read_audio(context_end, context_end + min(span.after, after_frames * HOP_LENGTH))
        example.target_latent = read_latents(start_frame + segment_frames, start_frame + segment_frames + after_frames)
    return example


def examples_from_files(paths: list[str], codec, segment_frames: int, start_seconds: float, span: Span,
                        device) -> tuple[list[Example], list[dict]]:
    """Context windows of audio files; a file that cannot be used goes to the failures, with the reason."""
    from music_continuation.data.audio_io import AudioLoadError, load_audio
    start_frame = int(round(start_seconds * FRAME_RATE))
    context_end = (start_frame + segment_frames) * HOP_LENGTH
    examples, failures = [], []
    for index, path in enumerate(paths):
        try:
            audio = load_audio(path)
        except (AudioLoadError, OSError) as error:
            failures.append({"source": str(path), "error": str(error)})
            continue
        if audio.shape[-1] < context_end:
            failures.append({"source": str(path), "error": (
                f"{path}: {audio.shape[-1] / SAMPLE_RATE:.2f} s of audio, shorter than --start {start_seconds:g} s "
                f"+ the context of {segment_frames} frames ({segment_frames / FRAME_RATE:.2f} s) = "
                f"{context_end / SAMPLE_RATE:.2f} s")})
            continue
        # Encode from the start of the file, as prepare_data.py does, so the latents of the context
        # window are exactly those the model would have seen in a cache of this file; once, up to the
        # end of the continuation (the encoder is causal: what follows does not change earlier frames).
        end_frame = min(audio.shape[-1] // HOP_LENGTH,
                        start_frame + segment_frames + math.ceil(span.after / HOP_LENGTH))
        latents = encode(codec, audio[:, : end_frame * HOP_LENGTH].unsqueeze(0).to(device))[0].float().cpu()
        examples.append(window_example(
            f"{index:02d}_{safe_name(Path(path).stem)}", str(path), lambda a, b, z=latents: z[:, a:b],
            lambda a, b, x=audio: x[:, a:b].clone(), end_frame, start_frame, segment_frames, span))
    return examples, failures


def choose_windows(dataset, count: int, before_frames: int, after_frames: int) -> list[tuple[dict, int]]:
    """Up to `count` windows (track, first context frame) of a ContinuationDataset, spread over its tracks.

    The tracks take turns (evenly spaced tracks when there are fewer examples than tracks). Within a
    track the windows are evenly spaced (first and last included) over those with room for
    `after_frames` after the context and `before_frames` before it, else over those with room after
    it, else over all of the track's windows (the references are then clipped at the track's end).
    """
    starts = {}
    for index in range(len(dataset)):
        track_id, start = dataset.window_location(index)
        starts.setdefault(track_id, []).append(start)
    tracks = [track for track in dataset.tracks if track["id"] in starts]
    if count < len(tracks):
        tracks = [tracks[i] for i in sorted({int(i) for i in np.linspace(0, len(tracks) - 1, count).round()})]
    chosen = []
    for turn, track in enumerate(tracks):
        share = len(range(turn, count, len(tracks)))
        room_after = [s for s in starts[track["id"]] if s + dataset.segment_frames + after_frames <= track["frames"]]
        pool = [s for s in room_after if s >= before_frames] or room_after or starts[track["id"]]
        picks = sorted({int(i) for i in np.linspace(0, len(pool) - 1, min(share, len(pool))).round()})
        chosen += [(track, pool[i]) for i in picks]
    return chosen


def open_track(cache_dir: str, track_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory maps of a cached track's (latents [128, F], audio [F * 320]); InferenceError naming a bad file."""
    from music_continuation.data.cache import track_paths
    arrays = []
    for path in track_paths(cache_dir, track_id):
        try:
            arrays.append(np.load(path, mmap_mode="r"))
        except (OSError, ValueError) as error:
            raise InferenceError(f"{path}: cannot read the cached array ({one_line(error)}); "
                                 f"re-run prepare_data.py") from None
    return arrays[0], arrays[1]


def examples_from_cache(cache_dir: str, split: str, segment_frames: int, num_samples: int, span: Span,
                        codec_print: str) -> list[Example]:
    """`num_samples` windows of the split (choose_windows), with their lead-in and continuation."""
    from music_continuation.data.cache import ContinuationDataset, audio_to_float
    try:
        dataset = ContinuationDataset(cache_dir, split, segment_frames)
        check_fingerprint(dataset.codec_fingerprint, codec_print, f"--from_cache {cache_dir}")
    except (ValueError, CodecLoadError) as error:
        raise InferenceError(one_line(error)) from None
    windows = choose_windows(dataset, num_samples, math.ceil(span.lead_in / HOP_LENGTH),
                             math.ceil(span.after / HOP_LENGTH))
    examples = []
    for number, (track, frame) in enumerate(windows):
        latents, audio = open_track(cache_dir, track["id"])
        source = track.get("source", track["id"])
        examples.append(window_example(
            f"{number:02d}_{safe_name(Path(source).stem)}_f{frame}",
            f"{cache_dir} [{split}] {source} @ {frame / FRAME_RATE:.2f} s",
            lambda a, b, z=latents: torch.from_numpy(np.array(z[:, a:b], dtype=np.float32)),
            lambda a, b, x=audio: torch.from_numpy(audio_to_float(x[a:b]))[None],
            track["frames"], frame, segment_frames, span))
    return examples


# --------------------------------------------------------------------------------------- generation

@torch.no_grad()
def continue_latents(model, normalizer, context: torch.Tensor, windows: int) -> torch.Tensor:
    """Raw latents [B, 128, T] -> the next windows * T latent frames, NORMALISED, autoregressively.

    Window w+1 is predicted from window w, the model's own (normalised) output: the model was
    trained on windows of exactly T frames, so it always reads the last T frames.
    """
    window = normalizer.normalize(context)
    predicted = []
    for _ in range(windows):
        window = model(window)
        predicted.append(window)
    return torch.cat(predicted, dim=-1)


@torch.no_grad()
def generate(examples: list[Example], model, normalizer, decoder, windows: int, batch_size: int, device) -> float:
    """Fill example.continuation and .predicted_latent; returns the wall seconds.

    All windows are decoded in one pass by evaluation.decode_latents, the second half of
    evaluation.predict_audio (one window is exactly predict_audio), so there is no seam between windows.
    """
    started = time.perf_counter()
    for first in range(0, len(examples), batch_size):
        batch = examples[first: first + batch_size]
        context = torch.stack([example.context_latent for example in batch]).to(device)
        latents = continue_latents(model, normalizer, context, windows)
        audio = evaluation.decode_latents(decoder, normalizer, latents).float().cpu()
        for example, continuation, predicted in zip(batch, audio, latents[..., :context.shape[-1]].float().cpu()):
            example.continuation, example.predicted_latent = continuation, predicted
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


@dataclass
class Scorer:
    """What scoring needs besides the example: the frozen decoder, the model's normaliser, the loss."""
    decoder: torch.nn.Module
    normalizer: torch.nn.Module
    loss_fn: CombinedLoss
    target_audio: str          # "original" or "codec" (resolved)
    device: torch.device | str
    listeners: object = None   # listeners.Listeners, or None with --no_listeners


@torch.no_grad()
def score(example: Example, segment_samples: int, scorer: Scorer) -> None:
    """Fill example.target, .metrics and .baselines (where the target is known) on the first predicted segment.

    The target played is the target scored: the original audio, or (codec) the true latents decoded in
    one pass from the seam, as the continuation is. The decoder is causal, so the first segment of that
    decoding is the window scorer decodes alone (evaluation.reference_audio) up to float rounding.
    """
    output = example.continuation[None, :, :segment_samples]
    if example.original is None:
        example.metrics = dict.fromkeys(METRIC_NAMES)
        example.metrics["rms_input"] = float(rms_loss(output, example.context_audio[None]))
        return
    normalizer, device, frames = scorer.normalizer, scorer.device, segment_samples // HOP_LENGTH
    target_latent = normalizer.normalize(example.target_latent[None].to(device))
    batch = {"input_latent": normalizer.normalize(example.context_latent[None].to(device)),
             "target_latent": target_latent[..., :frames],
             "input_audio": example.context_audio[None].to(device),
             "target_audio": example.original[None, :, :segment_samples].to(device)}
    decoded = evaluation.decode_windows(batch, scorer.decoder, normalizer)
    references = evaluation.reference_audio(batch, scorer.decoder, normalizer, scorer.target_audio, decoded)
    model_sums = ScoreSums(device, f"{example.name}: model").add(
        output.to(device), references, scorer.loss_fn, example.predicted_latent[None].to(device),
        batch["target_latent"], musical=True, listeners=scorer.listeners)
    baseline_sums = evaluation.score_baselines_batch(batch, scorer.decoder, normalizer, scorer.loss_fn,
                                                     scorer.target_audio, musical=True, decoded=decoded,
                                                     listeners=scorer.listeners)
    example.sums = {MODEL_ROW: model_sums, **baseline_sums}
    example.metrics = example_figures(model_sums)
    example.baselines = {name: example_figures(baseline_sums[name]) for name in BASELINES}
    if scorer.target_audio == "original":
        example.target = example.original
    else:
        decoded_target = evaluation.decode_latents(scorer.decoder, normalizer, target_latent)
        example.target = decoded_target[0, :, : example.original.shape[-1]].float().cpu()


def example_figures(sums: ScoreSums) -> dict:
    """One example's figures: frechet_codec is a figure of a set of examples (one example's frames are too few
    for a full-rank covariance), so it is left to the mean (mean_metrics)."""
    alone = ScoreSums.from_vector(sums.vector(), sums.label)
    alone.frechet.zero_()
    return alone.means()


def set_frechet(examples: list[Example], row: str) -> float | None:
    """frechet_codec of every scored example's frames together: their Fréchet sums added, not a mean of means."""
    sums = [example.sums[row] for example in examples if example.sums]
    return functools.reduce(operator.add, sums).means()["frechet_codec"] if sums else None


def mean_figures(figure_dicts: list[dict]) -> dict:
    """{name: mean over the dicts holding a value for it, or None}."""
    means = {}
    for name in METRIC_NAMES:
        values = [figures[name] for figures in figure_dicts if figures.get(name) is not None]
        means[name] = float(np.mean(values)) if values else None
    return means


def mean_metrics(examples: list[Example]) -> tuple[dict, dict | None]:
    """(the model's mean figures, {baseline: mean figures} over the examples with baselines, or None)."""
    scored = [example.baselines for example in examples if example.baselines]
    baselines = {name: mean_figures([b[name] for b in scored]) for name in BASELINES} if scored else None
    means = mean_figures([example.metrics for example in examples])
    means["frechet_codec"] = set_frechet(examples, MODEL_ROW)
    for name in baselines or ():
        baselines[name]["frechet_codec"] = set_frechet(examples, name)
    return means, baselines


# ------------------------------------------------------------------------------------------ writing

def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp_path:
        tmp_path.write_text(text, encoding="utf-8")


def write_wav(path: Path, audio: torch.Tensor) -> None:
    """24 kHz mono 32-bit float WAV (lossless: the samples read back bit-identical), written atomically."""
    with atomic_path(path) as tmp_path:
        soundfile.write(str(tmp_path), audio.reshape(-1).numpy().astype(np.float32), SAMPLE_RATE, subtype="FLOAT")


def example_segments(example: Example, continuation_samples: int, target_audio: str) -> dict:
    """{segment: audio} of one example (listening_page.SEGMENTS), the endings cut to the continuation's length."""
    segments = {"lead_in": example.lead_in, "context": example.context_audio,
                "continuation": example.continuation[:, :continuation_samples]}
    if example.target is not None:
        segments["target"] = example.target[:, :continuation_samples]
        if target_audio == "codec":       # else the target is the original audio
            segments["original"] = example.original[:, :continuation_samples]
    return segments


def clear_previous_run(out_dir: Path) -> None:
    """Remove the examples an earlier run wrote into OUT_DIR, so that the page and the folder hold this run's only.

    Only files that the earlier run's metrics.json lists (and its blind_key.json) are removed, each checked to lie
    inside OUT_DIR; an example folder goes only once it is empty, so anything else a user put there stays."""
    try:
        previous = json.loads((out_dir / "metrics.json").read_text())
        examples = previous["examples"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    root = out_dir.resolve()
    removed = 0
    for example in examples if isinstance(examples, list) else []:
        files = example.get("files") if isinstance(example, dict) else None
        for relative in (files or {}).values():
            path = (out_dir / str(relative)).resolve()
            if root in path.parents and path.is_file() and not path.is_symlink():
                path.unlink()
        folder = (out_dir / str(example.get("name", ""))).resolve()
        if root in folder.parents and folder.is_dir():
            with contextlib.suppress(OSError):      # not empty: files that are not ours stay
                folder.rmdir()
                removed += 1
    (out_dir / "blind_key.json").unlink(missing_ok=True)
    if removed:
        print(f"note: removed the {removed} example(s) of the previous run in {out_dir}", file=sys.stderr)


def write_example(out_dir: Path, example: Example, continuation_samples: int, segment_samples: int,
                  target_audio: str) -> dict:
    """The WAVs and spectrogram(s) of one example (module docstring); returns {role: relative path}."""
    folder = out_dir / example.name
    folder.mkdir(parents=True, exist_ok=True)
    segments = example_segments(example, continuation_samples, target_audio)
    before = torch.cat([example.lead_in, example.context_audio], dim=-1)
    endings = [ending for ending in ENDINGS if ending in segments]
    players = {player(ending): torch.cat([before, segments[ending]], dim=-1) for ending in endings}
    # A browser clips at full scale, and decoded audio can peak above it: one gain for all the players of
    # the example keeps the loudest below clipping and every level ratio as it is.
    peak = max(float(samples.abs().max()) for samples in players.values())
    example.player_gain = min(1.0, PLAYER_PEAK / peak) if peak > 0 else 1.0
    audio = {role: samples for role, samples in segments.items() if samples.shape[-1] > 0}   # no empty lead-in
    audio.update({role: samples * example.player_gain for role, samples in players.items()})
    files = {}
    for role, samples in audio.items():
        write_wav(folder / f"{role}.wav", samples)
        files[role] = f"{example.name}/{role}.wav"
    marks = {"context_start": example.lead_in.shape[-1] or None,
             "window_joins": tuple(range(segment_samples, continuation_samples, segment_samples))}
    plot_continuations(folder / "spectrogram.png", before,
                       [(ending_title(ending, target_audio), segments[ending]) for ending in endings], **marks)
    files["spectrogram"] = f"{example.name}/spectrogram.png"
    if example.blind is not None:
        for label, ending in example.blind.items():
            write_wav(folder / f"{label}.wav", audio[player(ending)])
            files[label] = f"{example.name}/{label}.wav"
        plot_continuations(folder / "spectrogram_ab.png", before,
                           [(label, segments[ending]) for label, ending in example.blind.items()], **marks)
        files["spectrogram_ab"] = f"{example.name}/spectrogram_ab.png"
    return files


BLIND_ENDINGS = ("continuation", "target")      # A and B: the model's and the target the figures score against


def assign_blind_labels(examples: list[Example], seed: int) -> dict:
    """Per example, shuffle BLIND_ENDINGS into A/B with a seeded generator; returns the key."""
    rng = np.random.default_rng(seed)
    key = {}
    for example in examples:
        if example.original is None:
            continue          # nothing to compare against: the page plays the continuation openly
        endings = list(BLIND_ENDINGS)
        if rng.random() < 0.5:
            endings.reverse()
        example.blind = {"A": endings[0], "B": endings[1]}
        key[example.name] = {"A": endings[0], "B": endings[1], "model": "A" if endings[0] == "continuation" else "B"}
    return key


def metrics_table(examples: list[Example], means: dict, mean_baselines: dict | None) -> str:
    """The console table: each example's model figures, then the means of the model and the baselines."""
    rows = [(e.name, e.metrics) for e in examples] + [("mean" if label == MODEL_ROW else f"mean {label}", figures)
                                                      for label, figures in figure_rows(means, mean_baselines)]
    width = max([len(name) for name, _ in rows] + [8])
    widths = {name: max(10, len(name)) for name in METRIC_NAMES}
    lines = [f"{'example':<{width}}  " + "  ".join(f"{name:>{widths[name]}}" for name in METRIC_NAMES)]
    for name, metrics in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{format_value(metrics.get(m)):>{widths[m]}}"
                                                      for m in METRIC_NAMES))
    return "\n".join(lines)


def log_to_mlflow(out_dir: Path, state: dict, tracking_uri: str | None) -> None:
    """Upload OUT_DIR as artifacts (samples/<out_dir name>) of the checkpoint's run; failures only warn."""
    run_id = state.get("mlflow_run_id")
    if not run_id:
        warn("--mlflow: the checkpoint records no MLflow run id; nothing logged")
        return
    args = state.get("args") or {}
    uri = tracking_uri or args.get("mlflow_tracking_uri") or args.get("tracking_uri")
    try:
        check_mlflow_server(uri)
        from mlflow.tracking import MlflowClient
        MlflowClient(tracking_uri=uri).log_artifacts(run_id, str(out_dir), artifact_path=f"samples/{out_dir.name}")
        print(f"logged {out_dir} to MLflow run {run_id} ({uri or 'default tracking URI'})")
    except Exception as error:  # noqa: BLE001 - MLflow is optional: a listening test must not fail on it
        warn(f"--mlflow: could not log to run {run_id} at {uri or 'the default tracking URI'} "
             f"({one_line(error)})")


# ---------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (best.pt / latest.pt)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="AUDIO", help="audio files (any format, rate, channels)")
    source.add_argument("--from_cache", metavar="CACHE", help="a cache made by prepare_data.py")
    parser.add_argument("--split", default="val", choices=("train", "val"), help="cache split (with --from_cache)")
    parser.add_argument("--num_samples", type=int, default=4, help="examples taken from the cache")
    parser.add_argument("--out_dir", required=True, help="folder for the WAVs, images, metrics and index.html")
    parser.add_argument("--start", type=float, default=0.0,
                        help="seconds into each --input file where the context starts")
    parser.add_argument("--continue_seconds", type=float, default=None,
                        help="length of the continuation (default: one segment); longer is autoregressive")
    parser.add_argument("--lead_in_seconds", type=float, default=4.0,
                        help="real audio played before the context, so a listener knows the music before the seam")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="seeds torch and the --blind shuffle")
    parser.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                        help="which weights to run: 'auto' the EMA average when the checkpoint has one (trained "
                             "with --ema_decay), else the raw ones; 'ema'; 'raw' the training weights")
    parser.add_argument("--batch_size", type=int, default=8, help="examples generated together")
    parser.add_argument("--blind", action="store_true", help="label the two players A/B in random order per example; "
                                                             "the key goes to blind_key.json")
    parser.add_argument("--target_audio", default=None, choices=TARGET_AUDIO_CHOICES,
                        help="what the figures compare with: the real audio (what the page plays), or 'codec': "
                             "the true latents decoded (the oracle then scores 0); auto = codec with the random "
                             "codec (default: the checkpoint's --target_audio; original if it records none)")
    parser.add_argument("--encodec_weights", default=None,
                        help="EnCodec weights (default: as recorded in the checkpoint); must match the checkpoint")
    parser.add_argument("--no_listeners", action="store_true",
                        help="skip the pretrained listeners (melody_f1, beat_f1, frechet_codec, ...: "
                             "docs/musical-figures.md)")
    parser.add_argument("--beat_tracker", default="librosa", choices=BEAT_TRACKERS,
                        help="beat tracker of beat_f1 (madmom: CC BY-NC-SA 4.0 models)")
    parser.add_argument("--mlflow", action="store_true", help="log the output folder to the checkpoint's MLflow run")
    parser.add_argument("--mlflow_tracking_uri", default=None,
                        help="MLflow tracking URI (default: the one recorded in the checkpoint's flags)")
    return parser


def check_flags(parser: argparse.ArgumentParser, args) -> None:
    if args.num_samples < 1:
        parser.error(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.start < 0:
        parser.error(f"--start must be >= 0, got {args.start}")
    if args.continue_seconds is not None and not args.continue_seconds > 0:
        parser.error(f"--continue_seconds must be > 0, got {args.continue_seconds}")
    if not args.lead_in_seconds >= 0:
        parser.error(f"--lead_in_seconds must be >= 0, got {args.lead_in_seconds}")
    for path in args.input or ():
        if not Path(path).exists():
            parser.error(f"--input {path}: no such file")
        if Path(path).is_dir():
            parser.error(f"--input {path}: is a directory, not an audio file")


def load_codec_for(args, state: dict):
    """(codec, weights, fingerprint) for the checkpoint; CodecLoadError if they do not match."""
    weights = args.encodec_weights or state.get("encodec_weights") or "pretrained"
    codec = load_codec(weights, args.device)
    codec_print = codec_fingerprint(codec)
    check_fingerprint(state["codec_fingerprint"], codec_print, f"--checkpoint {args.checkpoint}")
    return codec, weights, codec_print


def collect_examples(args, codec, codec_print: str, segment_frames: int, continuation_samples: int):
    """(examples, failures) from --input or --from_cache; every failure is also printed on one line."""
    failures = []
    # at least one segment after the context: the figures need the whole first target window
    span = Span(lead_in=int(round(args.lead_in_seconds * SAMPLE_RATE)),
                after=max(continuation_samples, segment_frames * HOP_LENGTH))
    if args.input:
        examples, failures = examples_from_files(args.input, codec, segment_frames, args.start, span, args.device)
    else:
        examples = examples_from_cache(args.from_cache, args.split, segment_frames, args.num_samples, span,
                                       codec_print)
    for failure in failures:
        print(f"error: {failure['error']}", file=sys.stderr)
    return examples, failures


def write_reports(out_dir: Path, args, state: dict, entries: list, failures: list, settings: dict,
                  timing: dict, key: dict | None) -> tuple[dict, dict | None]:
    """metrics.json, blind_key.json (with --blind) and index.html; returns the means (model, baselines)."""
    means, mean_baselines = mean_metrics([example for example, _ in entries])
    write_json(out_dir / "metrics.json", {
        "settings": settings,
        "metrics_on": "first predicted segment against the target's first segment (rms_input: the context); "
                      "baselines silence / repeat / oracle scored the same way "
                      "(music_continuation/evaluation/inference.py docstring)",
        "examples": [{"name": e.name, "source": e.source, "files": files, "player_gain": e.player_gain,
                      "metrics": e.metrics, "baselines": e.baselines} for e, files in entries],
        "mean": means, "mean_baselines": mean_baselines, "failed": failures, "timing": timing})
    if key is not None:
        write_json(out_dir / "blind_key.json", {
            "meaning": "EXAMPLE/A.wav and EXAMPLE/B.wav are copies of EXAMPLE/player_<named>.wav; 'model' is "
                       "the label of the model's continuation", "seed": args.seed, "examples": key})
    windows = settings["windows"]
    page_settings = {"checkpoint": args.checkpoint, "epoch": state.get("epoch"),
                     "weights": state["weights_used"],
                     "lead-in": f"up to {settings['lead_in_seconds']:.2f} s",
                     "context": f"{settings['segment_seconds']:.2f} s",
                     "continuation": f"{settings['continue_seconds']:.2f} s"
                     + (f" ({windows} windows, autoregressive)" if windows > 1 else ""),
                     "target": f"{TARGET_WHAT[settings['target_audio']]} (--target_audio {settings['target_audio']})",
                     "codec": settings["encodec_weights"]}
    page = render_page(f"Continuations: {out_dir.name}", page_settings, entries, means, mean_baselines, failures,
                       blind=bool(args.blind), target_audio=settings["target_audio"],
                       random_codec=settings["encodec_weights"] == "random")
    write_text_atomic(out_dir / "index.html", page)
    return means, mean_baselines


def run(args) -> int:
    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir)
    model, normalizer, state = load_model(args.checkpoint, args.device, args.weights)
    segment_frames = segment_frames_of(state, args.checkpoint)
    segment_samples = segment_frames * HOP_LENGTH
    codec, weights, codec_print = load_codec_for(args, state)
    recorded = (state.get("args") or {}).get("target_audio", "original")   # older checkpoints record none
    target_audio = evaluation.resolve_target_audio(args.target_audio or recorded, weights)
    continuation_samples = (segment_samples if args.continue_seconds is None
                            else int(round(args.continue_seconds * SAMPLE_RATE)))
    windows = max(1, math.ceil(continuation_samples / segment_samples))
    examples, failures = collect_examples(args, codec, codec_print, segment_frames, continuation_samples)
    if not examples:
        print(f"error: none of the {len(failures)} input(s) could be used (listed above); nothing written",
              file=sys.stderr)
        return 1

    decoder = FrozenDecoder(codec)
    listeners = None
    if not args.no_listeners:
        from music_continuation.evaluation.listeners import Listeners
        listeners = Listeners(codec, args.beat_tracker, args.device)
    del codec
    wall = generate(examples, model, normalizer, decoder, windows, args.batch_size, args.device)
    generated_seconds = len(examples) * windows * segment_samples / SAMPLE_RATE
    loss_fn = CombinedLoss(**evaluation.loss_weights_of(state.get("args") or {})).to(args.device)
    scorer = Scorer(decoder, normalizer, loss_fn, target_audio, args.device, listeners)
    for example in examples:
        score(example, segment_samples, scorer)

    out_dir.mkdir(parents=True, exist_ok=True)
    clear_previous_run(out_dir)
    key = assign_blind_labels(examples, args.seed) if args.blind else None
    entries = [(example, write_example(out_dir, example, continuation_samples, segment_samples, target_audio))
               for example in examples]
    timing = {"generated_seconds": generated_seconds, "generation_wall_seconds": round(wall, 4),
              "seconds_per_generated_second": round(wall / generated_seconds, 4) if generated_seconds else None,
              "device": str(args.device), "batch_size": args.batch_size}
    settings = {"checkpoint": str(args.checkpoint), "segment_frames": segment_frames,
                "segment_seconds": segment_frames / FRAME_RATE, "continue_seconds": continuation_samples / SAMPLE_RATE,
                "windows": windows, "lead_in_seconds": args.lead_in_seconds,
                "encodec_weights": weights, "codec_fingerprint": codec_print,
                "start": args.start if args.input else None, "seed": args.seed, "blind": bool(args.blind),
                "epoch": state.get("epoch"), "target_audio": target_audio,
                "loss_weights": dict(loss_fn.weights)}
    means, mean_baselines = write_reports(out_dir, args, state, entries, failures, settings, timing, key)

    print(metrics_table(examples, means, mean_baselines))
    print(f"generated {generated_seconds:.2f} s of audio in {wall:.2f} s on {args.device} "
          f"({wall / generated_seconds:.3f} s per generated second)")
    print(f"wrote {len(examples)} example(s) to {out_dir}; open {out_dir / 'index.html'}"
          + (f"; key in {out_dir / 'blind_key.json'}" if key is not None else ""))
    if args.mlflow:
        log_to_mlflow(out_dir, state, args.mlflow_tracking_uri)
    if failures:
        print(f"error: {len(failures)} of {len(failures) + len(examples)} input(s) failed (listed above)",
              file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    return run_command(build_parser(), check_flags, run, argv,
                       (InferenceError, CodecLoadError, EvaluationError, ListenerUnavailable))


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
