"""Continuations for listening tests: WAVs, spectrograms, objective metrics and a listening page.

    python inference_sample.py --checkpoint runs/x/best.pt --input song.flac other.mp3 --out_dir samples/x \
        [--start 30] [--continue_seconds 8] [--blind] [--mlflow]
    python inference_sample.py --checkpoint runs/x/best.pt --from_cache data_cache/demo --split val \
        --num_samples 8 --out_dir samples/x

For each example the context is `segment_frames` latent frames (the model's input window) starting
at --start (rounded to the 13.3 ms latent frame grid) of an input file, or one window of a prepared
cache (evenly spaced over the split's windows; --start applies to --input only). The model predicts
the next window; longer --continue_seconds continue autoregressively, the model reading its own last
predicted window each time. The predicted latents are denormalised and decoded by the frozen EnCodec
decoder in one pass (so there is no seam between windows), then trimmed to --continue_seconds.

Written to OUT_DIR/<example>/, all 24 kHz mono 32-bit float WAV:
    context.wav                     the REAL audio of the context window (from the file / the cache),
                                    not the decoded latents: it is what the model was shown
    continuation.wav                the decoded prediction
    context_plus_continuation.wav   context.wav followed by continuation.wav (its first samples are
                                    exactly those of context.wav): what a listener hears
    target.wav, context_plus_target.wav   when the real continuation is known (always for a cache;
                                    for a file, when it holds at least one segment after the context)
    spectrogram.png                 log-mel of context+continuation above context+target, one colour
                                    scale, the seam marked
OUT_DIR/metrics.json (per example and mean), OUT_DIR/index.html (the listening page) and, with --blind,
OUT_DIR/blind_key.json (which of A/B is the model) plus A.wav / B.wav / spectrogram_ab.png per example.

Metrics (against the real continuation, where known) are computed on the FIRST predicted segment:
the continuation's first segment_frames * 320 samples against the target segment and the context
(an autoregressive run is scored on that first window too, since the cache holds one target window):
    rms_input, rms_target, spectral, mel   losses.CombinedLoss components (the training losses)
    rhythm, chroma                         listening_metrics.py (definitions there)
Without a known continuation only rms_input is computed.

Exit status: 0 when every example was written; 1 when some inputs failed (the others are still
written); 2 when nothing can run (bad checkpoint, codec mismatch, bad cache or flags).
"""
from __future__ import annotations

import argparse
import html
import json
import math
import re
import sys
import time
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
import torch

from codec import (FRAME_RATE, HOP_LENGTH, SAMPLE_RATE, CodecLoadError, FrozenDecoder, check_fingerprint,
                   codec_fingerprint, encode, load_codec)
from losses import LOSS_COMPONENTS, CombinedLoss, rms_loss
from listening_metrics import listening_metrics, log_mel
from utils import atomic_path, check_mlflow_server, one_line, warn

METRIC_NAMES = LOSS_COMPONENTS + ("rhythm", "chroma")
LOWER_IS_BETTER = {"rms_input": True, "rms_target": True, "spectral": True, "mel": True,
                   "rhythm": False, "chroma": False}
SPECTROGRAM_RANGE = math.log(1e4)   # colour range of the log-mel image: 80 dB of magnitude below the peak
PLAYED = ("context_plus_continuation", "context_plus_target")


class InferenceError(RuntimeError):
    """Nothing can be generated (bad checkpoint, codec mismatch, bad cache); one-line message."""


@dataclass
class Example:
    """One context to continue. Latents are raw (not normalised); audio is float32 [1, N] on the CPU."""
    name: str
    source: str
    context_latent: torch.Tensor               # [128, T]
    context_audio: torch.Tensor                # [1, T * 320], the real audio of the context window
    target_audio: torch.Tensor | None = None   # the real audio after the context (>= one segment) or None
    continuation: torch.Tensor | None = None   # [1, windows * T * 320], filled by generate()
    metrics: dict = field(default_factory=dict)
    blind: dict | None = None                  # {"A": "context_plus_...", "B": ...} with --blind


# ------------------------------------------------------------------------------------------- inputs

def safe_name(text: str) -> str:
    """A file-system and URL friendly version of `text`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[:60] or "example"


def load_model(checkpoint: str, device: str):
    """(model, normalizer, checkpoint dict), any failure as InferenceError naming the file."""
    from checkpoint import load_model_for_inference
    try:
        model, normalizer, state = load_model_for_inference(checkpoint, device)
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


def examples_from_files(paths: list[str], codec, segment_frames: int, start_seconds: float,
                        target_samples: int, device) -> tuple[list[Example], list[dict]]:
    """Context windows of audio files; a file that cannot be used goes to the failures, with the reason."""
    from data import AudioLoadError, load_audio
    start_frame = int(round(start_seconds * FRAME_RATE))
    context_start, context_end = start_frame * HOP_LENGTH, (start_frame + segment_frames) * HOP_LENGTH
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
        # window are exactly those the model would have seen in a cache of this file.
        latents = encode(codec, audio[:, :context_end].unsqueeze(0).to(device))[0, :, start_frame:].float().cpu()
        after = audio[:, context_end: context_end + target_samples]
        target = after if after.shape[-1] >= segment_frames * HOP_LENGTH else None
        examples.append(Example(name=f"{index:02d}_{safe_name(Path(path).stem)}", source=str(path),
                                context_latent=latents, context_audio=audio[:, context_start:context_end].clone(),
                                target_audio=None if target is None else target.clone()))
    return examples, failures


def examples_from_cache(cache_dir: str, split: str, segment_frames: int, num_samples: int,
                        codec_print: str) -> list[Example]:
    """`num_samples` windows evenly spaced over the split (first and last included)."""
    from data import ContinuationDataset
    try:
        dataset = ContinuationDataset(cache_dir, split, segment_frames)
        check_fingerprint(dataset.codec_fingerprint, codec_print, f"--from_cache {cache_dir}")
    except (ValueError, CodecLoadError) as error:
        raise InferenceError(one_line(error)) from None
    count = min(num_samples, len(dataset))
    indices = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, count).round()})
    sources = {track["id"]: track["source"] for track in dataset.manifest["tracks"]}
    examples = []
    for number, index in enumerate(indices):
        item = dataset[index]
        track_id, frame = dataset.window_location(index)
        # The cache normalises with its own statistics; undo them (the model's own are applied later).
        raw = item["input_latent"] * dataset.latent_std[:, None] + dataset.latent_mean[:, None]
        source = sources.get(track_id, track_id)
        examples.append(Example(
            name=f"{number:02d}_{safe_name(Path(source).stem)}_f{frame}",
            source=f"{cache_dir} [{split}] {source} @ {frame / FRAME_RATE:.2f} s",
            context_latent=raw, context_audio=item["input_audio"], target_audio=item["target_audio"]))
    return examples


# --------------------------------------------------------------------------------------- generation

@torch.no_grad()
def continue_latents(model, normalizer, context: torch.Tensor, windows: int) -> torch.Tensor:
    """Raw latents [B, 128, T] -> the next windows * T raw latent frames, autoregressively.

    Window w+1 is predicted from window w, the model's own (normalised) output: the model was
    trained on windows of exactly T frames, so it always reads the last T frames.
    """
    window = normalizer.normalize(context)
    predicted = []
    for _ in range(windows):
        window = model(window)
        predicted.append(window)
    return normalizer.denormalize(torch.cat(predicted, dim=-1))


@torch.no_grad()
def generate(examples: list[Example], model, normalizer, decoder, windows: int, batch_size: int, device) -> float:
    """Fill example.continuation (decoded audio of every predicted window); returns the wall seconds."""
    started = time.perf_counter()
    for first in range(0, len(examples), batch_size):
        batch = examples[first: first + batch_size]
        context = torch.stack([example.context_latent for example in batch]).to(device)
        audio = decoder(continue_latents(model, normalizer, context, windows)).float().cpu()
        for example, continuation in zip(batch, audio):
            example.continuation = continuation
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def score(example: Example, segment_samples: int, combined: CombinedLoss) -> dict:
    """The six figures of the module docstring on the first predicted segment (None where unknown)."""
    output = example.continuation[:, :segment_samples]
    metrics = dict.fromkeys(METRIC_NAMES)
    if example.target_audio is None:
        metrics["rms_input"] = float(rms_loss(output[None], example.context_audio[None]))
        return metrics
    target = example.target_audio[:, :segment_samples]
    with torch.no_grad():
        _, components = combined(output[None], example.context_audio[None], target[None])
    metrics.update({name: float(value) for name, value in components.items()})
    metrics.update(listening_metrics(output, target))
    return metrics


def mean_metrics(examples: list[Example]) -> dict:
    means = {}
    for name in METRIC_NAMES:
        values = [example.metrics[name] for example in examples if example.metrics.get(name) is not None]
        means[name] = float(np.mean(values)) if values else None
    return means


# ------------------------------------------------------------------------------------------ writing

def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp_path:
        tmp_path.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_wav(path: Path, audio: torch.Tensor) -> None:
    """24 kHz mono 32-bit float WAV (lossless: the samples read back bit-identical), written atomically."""
    with atomic_path(path) as tmp_path:
        soundfile.write(str(tmp_path), audio.reshape(-1).numpy().astype(np.float32), SAMPLE_RATE, subtype="FLOAT")


def plot_spectrograms(path: Path, rows: list[tuple[str, torch.Tensor]], seam_seconds: float,
                      window_marks: tuple[float, ...] = ()) -> None:
    """Log-mel images of `rows` [(title, audio)], stacked, one colour scale, a line at the seam.

    `window_marks` (seconds) are dotted lines on the first row where autoregressive windows join.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [log_mel(audio).numpy() for _, audio in rows]
    vmax = max(float(spec.max()) for spec in specs)
    vmin = max(min(float(spec.min()) for spec in specs), vmax - SPECTROGRAM_RANGE)
    longest = max(audio.shape[-1] for _, audio in rows) / SAMPLE_RATE
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 2.6 * len(rows)), squeeze=False, sharex=True)
    for ax, (title, audio), spec in zip(axes[:, 0], rows, specs):
        image = ax.imshow(spec, origin="lower", aspect="auto", cmap="magma", vmin=vmin, vmax=vmax,
                          extent=(0.0, audio.shape[-1] / SAMPLE_RATE, 0, spec.shape[0]), interpolation="nearest")
        ax.axvline(seam_seconds, color="cyan", linewidth=1.5, linestyle="--")
        for mark in window_marks if ax is axes[0, 0] else ():
            ax.axvline(mark, color="white", linewidth=0.8, linestyle=":")
        ax.set_xlim(0.0, longest)
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_ylabel("mel band")
    axes[-1, 0].set_xlabel("seconds (dashed line: end of the context"
                           + ("; dotted: next autoregressive window)" if window_marks else ")"))
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="log mel magnitude", pad=0.01)
    with atomic_path(path) as tmp_path:
        fig.savefig(tmp_path, dpi=80)
    plt.close(fig)


def write_example(out_dir: Path, example: Example, continuation_samples: int) -> dict:
    """The WAVs and spectrogram(s) of one example; returns {role: relative path}."""
    folder = out_dir / example.name
    folder.mkdir(parents=True, exist_ok=True)
    continuation = example.continuation[:, :continuation_samples]
    audio = {"context": example.context_audio, "continuation": continuation,
             "context_plus_continuation": torch.cat([example.context_audio, continuation], dim=-1)}
    if example.target_audio is not None:
        target = example.target_audio[:, :continuation_samples]
        audio["target"] = target
        audio["context_plus_target"] = torch.cat([example.context_audio, target], dim=-1)
    files = {}
    for role, samples in audio.items():
        write_wav(folder / f"{role}.wav", samples)
        files[role] = f"{example.name}/{role}.wav"
    seam = example.context_audio.shape[-1] / SAMPLE_RATE
    titles = {"context_plus_continuation": "context + continuation (model)",
              "context_plus_target": "context + target (real)"}
    segment_seconds = example.context_audio.shape[-1] / SAMPLE_RATE       # context and window have one length
    joins = tuple(seam + k * segment_seconds for k in range(1, math.ceil(continuation.shape[-1] / segment_seconds
                                                                          / SAMPLE_RATE - 1e-9)))
    plot_spectrograms(folder / "spectrogram.png", [(titles[role], audio[role]) for role in PLAYED if role in audio],
                      seam, joins)
    files["spectrogram"] = f"{example.name}/spectrogram.png"
    if example.blind is not None:
        for label, role in example.blind.items():
            write_wav(folder / f"{label}.wav", audio[role])
            files[label] = f"{example.name}/{label}.wav"
        plot_spectrograms(folder / "spectrogram_ab.png",
                          [(f"{label}", audio[role]) for label, role in example.blind.items()], seam)
        files["spectrogram_ab"] = f"{example.name}/spectrogram_ab.png"
    return files


def assign_blind_labels(examples: list[Example], seed: int) -> dict:
    """Per example, shuffle (continuation, target) into A/B with a seeded generator; returns the key."""
    rng = np.random.default_rng(seed)
    key = {}
    for example in examples:
        if example.target_audio is None:
            continue          # nothing to compare against: the page plays the continuation openly
        roles = list(PLAYED)
        if rng.random() < 0.5:
            roles.reverse()
        example.blind = {"A": roles[0], "B": roles[1]}
        key[example.name] = {"A": roles[0], "B": roles[1], "model": "A" if roles[0] == PLAYED[0] else "B"}
    return key


def format_value(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def metrics_table(rows: list[tuple[str, dict]]) -> str:
    width = max([len(name) for name, _ in rows] + [8])
    lines = [f"{'example':<{width}}  " + "  ".join(f"{name:>10}" for name in METRIC_NAMES)]
    for name, metrics in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{format_value(metrics.get(m)):>10}" for m in METRIC_NAMES))
    return "\n".join(lines)


PAGE_STYLE = """
body { font-family: sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em; color: #222; }
section { border-top: 1px solid #ccc; padding: 1em 0; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.player { margin: 0.4em 0; } .player span { display: inline-block; width: 15em; font-weight: bold; }
audio { vertical-align: middle; } img { max-width: 100%; } .note { color: #555; font-size: 0.9em; }
.failed { color: #a00; }
"""


def _url(relative: str) -> str:
    return html.escape(urllib.parse.quote(relative), quote=True)


def _metrics_html(rows: list[tuple[str, dict]]) -> str:
    header = "".join(f"<th>{name}{' &darr;' if LOWER_IS_BETTER[name] else ' &uarr;'}</th>" for name in METRIC_NAMES)
    body = "".join(f"<tr><td>{html.escape(label)}</td>"
                   + "".join(f"<td>{format_value(metrics.get(name))}</td>" for name in METRIC_NAMES) + "</tr>"
                   for label, metrics in rows)
    return f"<table><tr><th></th>{header}</tr>{body}</table>"


def render_page(title: str, settings: dict, entries: list[tuple[Example, dict]], means: dict,
                failures: list[dict], blind: bool) -> str:
    """The self-contained listening page: inline CSS, relative links only, nothing fetched from elsewhere."""
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{PAGE_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    parts.append("<p class=\"note\">" + "; ".join(f"{html.escape(k)}: {html.escape(str(v))}" for k, v in settings.items())
                 + "</p>")
    if blind:
        parts.append("<p>Blind test: for each example, one of A and B is the model's continuation and the "
                     "other the real music; both start with the same real context. The key is in "
                     "<code>blind_key.json</code> (do not open it before listening).</p>")
    else:
        parts.append("<p>Each example plays the real context followed by the model's continuation, then the "
                     "same context followed by the real continuation. In the spectrograms the dashed line "
                     "marks where the context ends.</p>")
    parts.append("<p class=\"note\">Metrics compare the first predicted segment with the real one: the four "
                 "training losses (&darr; lower is better: rms_input against the context, the others against the "
                 "target) and rhythm (onset-envelope correlation) and chroma (mean-chroma cosine), "
                 "&uarr; 1.0 is best; see listening_metrics.py.</p>")
    if entries:
        parts.append("<h2>Mean over examples</h2>" + _metrics_html([("mean", means)]))
    for example, files in entries:
        parts.append(f"<section><h2>{html.escape(example.name)}</h2>"
                     f"<p class=\"note\">{html.escape(example.source)}</p>")
        if example.blind is not None:
            players = [(label, files[label]) for label in ("A", "B")]
            image = files["spectrogram_ab"]
        else:
            players = [(f"context + {'continuation (model)' if role == PLAYED[0] else 'target (real)'}", files[role])
                       for role in PLAYED if role in files]
            image = files["spectrogram"]
        for label, relative in players:
            parts.append(f"<div class=\"player\"><span>{html.escape(label)}</span>"
                         f"<audio controls preload=\"none\" src=\"{_url(relative)}\"></audio></div>")
        parts.append(f"<p><img src=\"{_url(image)}\" alt=\"log-mel spectrograms of {html.escape(example.name)}\"></p>")
        parts.append(_metrics_html([(example.name, example.metrics)]))
        if example.blind is None:
            links = " &middot; ".join(f"<a href=\"{_url(files[role])}\">{role}.wav</a>"
                                      for role in ("context", "continuation", "target") if role in files)
            parts.append(f"<p class=\"note\">files: {links}</p>")
        parts.append("</section>")
    if failures:
        parts.append("<section><h2>Failed inputs</h2><ul>" + "".join(
            f"<li class=\"failed\">{html.escape(failure['error'])}</li>" for failure in failures) + "</ul></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (best.pt / latest.pt)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="AUDIO", help="audio files (any format, rate, channels)")
    source.add_argument("--from_cache", metavar="CACHE", help="a cache made by prepare_data.py")
    parser.add_argument("--split", default="val", choices=("train", "val"), help="cache split (with --from_cache)")
    parser.add_argument("--num_samples", type=int, default=4, help="examples taken from the cache")
    parser.add_argument("--out_dir", required=True, help="folder for the WAVs, images, metrics and index.html")
    parser.add_argument("--start", type=float, default=0.0, help="seconds into each --input file where the context starts")
    parser.add_argument("--continue_seconds", type=float, default=None,
                        help="length of the continuation (default: one segment); longer is autoregressive")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="seeds torch and the --blind shuffle")
    parser.add_argument("--batch_size", type=int, default=8, help="examples generated together")
    parser.add_argument("--blind", action="store_true", help="label the two players A/B in random order per example; "
                                                             "the key goes to blind_key.json")
    parser.add_argument("--encodec_weights", default=None,
                        help="EnCodec weights (default: as recorded in the checkpoint); must match the checkpoint")
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


def run(args) -> int:
    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir)
    model, normalizer, state = load_model(args.checkpoint, args.device)
    segment_frames = segment_frames_of(state, args.checkpoint)
    segment_samples = segment_frames * HOP_LENGTH
    weights = args.encodec_weights or state.get("encodec_weights") or "pretrained"
    codec = load_codec(weights, args.device)
    codec_print = codec_fingerprint(codec)
    check_fingerprint(state["codec_fingerprint"], codec_print, f"--checkpoint {args.checkpoint}")

    continuation_samples = (segment_samples if args.continue_seconds is None
                            else int(round(args.continue_seconds * SAMPLE_RATE)))
    windows = max(1, math.ceil(continuation_samples / segment_samples))
    failures = []
    if args.input:
        examples, failures = examples_from_files(args.input, codec, segment_frames, args.start,
                                                 max(continuation_samples, segment_samples), args.device)
    else:
        examples = examples_from_cache(args.from_cache, args.split, segment_frames, args.num_samples, codec_print)
    for failure in failures:
        print(f"error: {failure['error']}", file=sys.stderr)

    decoder = FrozenDecoder(codec)
    del codec
    wall = generate(examples, model, normalizer, decoder, windows, args.batch_size, args.device)
    generated_seconds = len(examples) * windows * segment_samples / SAMPLE_RATE
    combined = CombinedLoss()
    for example in examples:
        example.metrics = score(example, segment_samples, combined)

    out_dir.mkdir(parents=True, exist_ok=True)
    key = assign_blind_labels(examples, args.seed) if args.blind else None
    entries = [(example, write_example(out_dir, example, continuation_samples)) for example in examples]
    means = mean_metrics(examples)
    timing = {"generated_seconds": generated_seconds, "generation_wall_seconds": round(wall, 4),
              "seconds_per_generated_second": round(wall / generated_seconds, 4) if generated_seconds else None,
              "device": str(args.device), "batch_size": args.batch_size}
    settings = {"checkpoint": str(args.checkpoint), "segment_frames": segment_frames,
                "segment_seconds": segment_frames / FRAME_RATE, "continue_seconds": continuation_samples / SAMPLE_RATE,
                "windows": windows, "encodec_weights": weights, "codec_fingerprint": codec_print,
                "start": args.start if args.input else None, "seed": args.seed, "blind": bool(args.blind),
                "epoch": state.get("epoch")}
    write_json_atomic(out_dir / "metrics.json", {
        "settings": settings, "metrics_on": "first predicted segment against the real one (rms_input: the context)",
        "examples": [{"name": e.name, "source": e.source, "files": files, "metrics": e.metrics}
                     for e, files in entries],
        "mean": means, "failed": failures, "timing": timing})
    if key is not None:
        write_json_atomic(out_dir / "blind_key.json", {
            "meaning": "EXAMPLE/A.wav and EXAMPLE/B.wav are copies of EXAMPLE/<named>.wav; 'model' is the "
                       "label of the model's continuation", "seed": args.seed, "examples": key})
    page_settings = {"checkpoint": args.checkpoint, "epoch": state.get("epoch"),
                     "context": f"{segment_frames / FRAME_RATE:.2f} s", "continuation": f"{continuation_samples / SAMPLE_RATE:.2f} s"
                     + (f" ({windows} windows, autoregressive)" if windows > 1 else "")}
    write_text_atomic(out_dir / "index.html", render_page(f"Continuations: {out_dir.name}", page_settings, entries,
                                                          means, failures, bool(args.blind)))

    if examples:
        print(metrics_table([(e.name, e.metrics) for e in examples] + [("mean", means)]))
        print(f"generated {generated_seconds:.2f} s of audio in {wall:.2f} s on {args.device} "
              f"({wall / generated_seconds:.3f} s per generated second)")
    print(f"wrote {len(examples)} example(s) to {out_dir}; open {out_dir / 'index.html'}"
          + (f"; key in {out_dir / 'blind_key.json'}" if key is not None else ""))
    if args.mlflow:
        log_to_mlflow(out_dir, state, args.mlflow_tracking_uri)
    if failures:
        print(f"error: {len(failures)} of {len(failures) + len(examples)} input(s) failed (listed above)", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # encodec's deprecated weight_norm: nothing to act on
        try:
            return run(args)
        except (InferenceError, CodecLoadError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
