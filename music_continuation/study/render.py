"""Render a blind listening test (MUSHRA, ITU-R BS.1534) from a finished ablation study or a list of checkpoints.

Every condition is heard on the same K windows: validation windows of the study's cache (chosen as
inference.py chooses them), or --input files at --start seconds. Per window (a trial) the conditions are:
    <cell>/seed<k>   each cell's continuation, from its best seed (lowest best_val_loss in best.pt: one
                     cell's seeds share their loss weights, so their validation losses compare) or each seed
    reference        the hidden reference: the target the figures score against (also played openly)
    original         the real audio after the context, where the target is the codec's decoding
    repeat           the repeat baseline: the context's latents decoded again as the continuation
    anchor           the reference's ending low-passed at ANCHOR_HZ (BS.1534's low anchor)
Every player is lead-in + context + that ending (the anchor filters the ending only: the seam is what is
judged), all of a trial's players scaled by one gain that keeps the loudest below full scale, as the
listening page does. The stimuli's file names are opaque (an HMAC of the trial and condition under the
test's secret), so re-rendering the same conditions gives the same test and keeps its ratings valid.
"""
from __future__ import annotations

import hmac
import math
import secrets
import shlex
import shutil
from pathlib import Path

from music_continuation.study.ratings import (
    ANCHOR,
    AUDIO_DIR,
    KEY_FILE,
    MODEL,
    ORIGINAL,
    OTHER_KINDS,
    RATINGS_DIR,
    REFERENCE,
    REPEAT,
    TEST_FILE,
    TOKEN_FILE,
    StudyError,
    Test,
    read_json,
    test_hash,
    write_json,
)

ANCHOR_HZ = 3500.0        # BS.1534-3's low anchor: the reference low-passed at 3.5 kHz
ANCHOR_ORDER = 8          # Butterworth order of the anchor's low-pass (applied forwards and backwards)
DEFAULT_TEST_DIR = "listening"     # the test's folder inside a study folder (where ablate.py's report finds it)


# --------------------------------------------------------------------------------------- conditions

def peek(path: Path) -> dict:
    """A checkpoint's small entries, memory-mapped (the weights are not read)."""
    import torch
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is the same user error
        raise StudyError(f"{path}: cannot read the checkpoint ({str(error).splitlines()[0][:200]})") from None
    return {key: state.get(key) for key in ("epoch", "best_val_loss", "mlflow_run_id")}


def flag_value(command: list[str], flag: str):
    return command[command.index(flag) + 1] if flag in command[:-1] else None


def study_conditions(out_dir: Path, cells: list[str] | None, each_seed: bool) -> tuple[list[dict], dict]:
    """(model conditions, study info {out_dir, data_dir, tracking_uri, parent_run_id}) of an ablate.py folder.
    Every chosen cell x seed must have finished (best.pt, and latest.pt at the last epoch)."""
    import json
    if not out_dir.is_dir():
        raise StudyError(f"--study {out_dir}: no such folder")
    records = {}
    for path in sorted(out_dir.glob("*/seed*/cell.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise StudyError(f"{path}: cannot read it ({error})") from None
        records.setdefault(record["name"], []).append((path.parent, record))
    if not records:
        raise StudyError(f"--study {out_dir}: no cells (no <cell>/seed<k>/cell.json): not an ablate.py study folder")
    if cells:
        unknown = [c for c in cells if c not in records]
        if unknown:
            raise StudyError(f"--cells {' '.join(unknown)}: no such cell in {out_dir} (it has {', '.join(records)})")
    chosen = cells or [c for c in records if not records[c][0][1]["settings"].get("unity_test")]
    conditions, info = [], {"out_dir": str(out_dir.resolve())}
    for cell in chosen:
        seeds = []
        for folder, record in sorted(records[cell], key=lambda item: item[1]["seed"]):
            best, last = folder / "best.pt", folder / "latest.pt"
            epochs = record["settings"].get("epochs")
            if not best.is_file():
                raise StudyError(f"cell {cell}/seed{record['seed']} has not finished ({best} is missing): finish "
                                 f"the study (the same ablate.py command) or leave it out with --cells")
            state = peek(last if last.is_file() else best)
            if epochs is not None and (state["epoch"] is None or state["epoch"] < epochs):
                raise StudyError(f"cell {cell}/seed{record['seed']} has not finished (epoch {state['epoch']} of "
                                 f"{epochs}): finish the study (the same ablate.py command) or leave it out with "
                                 f"--cells")
            best_state = peek(best)
            seeds.append({"name": f"{cell}/seed{record['seed']}", "kind": MODEL, "cell": cell,
                          "seed": record["seed"], "checkpoint": str(best),
                          "run_id": best_state["mlflow_run_id"], "best_val_loss": best_state["best_val_loss"]})
            command = shlex.split(record.get("command", ""))
            info.setdefault("data_dir", record["settings"].get("data_dir"))
            info.setdefault("tracking_uri", flag_value(command, "--mlflow_tracking_uri"))
            info.setdefault("parent_run_id", flag_value(command, "--mlflow_parent_run_id"))
        if not each_seed:
            seeds = [min(seeds, key=lambda s: math.inf if s["best_val_loss"] is None else s["best_val_loss"])]
        conditions += seeds
    return conditions, info


def checkpoint_conditions(paths: list[str], names: list[str] | None) -> list[dict]:
    """Model conditions of --checkpoints (named by --names, else by their folder)."""
    if names and len(names) != len(paths):
        raise StudyError(f"--names gives {len(names)} names for {len(paths)} --checkpoints")
    conditions = []
    for index, path in enumerate(paths):
        if not Path(path).is_file():
            raise StudyError(f"--checkpoints {path}: no such file")
        name = names[index] if names else Path(path).resolve().parent.name
        if name in OTHER_KINDS or name in [c["name"] for c in conditions]:
            raise StudyError(f"--checkpoints {path}: the name {name!r} is taken (give --names)")
        state = peek(Path(path))
        conditions.append({"name": name, "kind": MODEL, "cell": name, "seed": None, "checkpoint": str(path),
                           "run_id": state["mlflow_run_id"], "best_val_loss": state["best_val_loss"]})
    return conditions


# ------------------------------------------------------------------------------------------- audio

def low_pass(audio, sample_rate: int):
    """The anchor: a zero-phase Butterworth low-pass at ANCHOR_HZ of [1, N] float audio."""
    import numpy as np
    import torch
    from scipy import signal
    sos = signal.butter(ANCHOR_ORDER, ANCHOR_HZ, btype="low", fs=sample_rate, output="sos")
    samples = audio.reshape(-1).double().numpy()
    pad = 3 * (2 * len(sos) + 1)
    filtered = signal.sosfiltfilt(sos, samples) if samples.size > pad else signal.sosfilt(sos, samples)
    return torch.from_numpy(np.ascontiguousarray(filtered, dtype=np.float32))[None]


def stimulus_name(secret: str, trial: str, condition: str) -> str:
    return hmac.new(secret.encode(), f"{trial}/{condition}".encode(), "sha256").hexdigest()[:12]


def render(conditions: list[dict], study: dict, out_dir: Path, source: dict, settings: dict) -> Test:
    """Generate every condition's endings on the same windows and write the test folder (module docstring).

    source: {"cache": path, "trials": K} or {"inputs": [paths], "start": seconds}; settings: continue_seconds,
    lead_in_seconds, device, batch_size, target_audio, encodec_weights, title."""
    import torch

    from music_continuation.codec import HOP_LENGTH, SAMPLE_RATE, CodecLoadError, FrozenDecoder, check_fingerprint
    from music_continuation.evaluation import inference
    from music_continuation.evaluation import scoring as evaluation
    device = settings["device"]
    models = []
    for condition in conditions:
        try:
            model, normalizer, state = inference.load_model(condition["checkpoint"], device)
        except inference.InferenceError as error:
            raise StudyError(str(error)) from None
        models.append((condition, model, normalizer, state))
    first = models[0][3]
    segment_frames = inference.segment_frames_of(first, conditions[0]["checkpoint"])
    for condition, _, _, state in models[1:]:
        if inference.segment_frames_of(state, condition["checkpoint"]) != segment_frames:
            raise StudyError(f"{condition['checkpoint']}: segment_frames {state.get('segment_frames')} differs "
                             f"from {conditions[0]['checkpoint']}'s {segment_frames}: one test needs one context")
    codec_args = type("Args", (), {"encodec_weights": settings.get("encodec_weights"), "device": device,
                                   "checkpoint": conditions[0]["checkpoint"]})
    try:
        codec, weights, codec_print = inference.load_codec_for(codec_args, first)
        for condition, _, _, state in models[1:]:
            check_fingerprint(state["codec_fingerprint"], codec_print, f"--checkpoint {condition['checkpoint']}")
    except CodecLoadError as error:
        raise StudyError(str(error)) from None
    recorded = (first.get("args") or {}).get("target_audio", "original")
    target_audio = evaluation.resolve_target_audio(settings.get("target_audio") or recorded, weights)
    segment_samples = segment_frames * HOP_LENGTH
    continue_seconds = settings.get("continue_seconds")
    continuation_samples = segment_samples if continue_seconds is None else int(round(continue_seconds * SAMPLE_RATE))
    windows = max(1, math.ceil(continuation_samples / segment_samples))
    span = inference.Span(lead_in=int(round(settings["lead_in_seconds"] * SAMPLE_RATE)),
                          after=max(continuation_samples, segment_samples))
    try:
        if "inputs" in source:
            examples, failures = inference.examples_from_files(source["inputs"], codec, segment_frames,
                                                               source["start"], span, device)
            if failures:
                raise StudyError(failures[0]["error"])
        else:
            examples = inference.examples_from_cache(source["cache"], "val", segment_frames, source["trials"],
                                                     span, codec_print)
    except inference.InferenceError as error:
        raise StudyError(str(error)) from None
    for example in examples:
        if example.original is None:
            raise StudyError(f"{example.source}: no {segment_samples / SAMPLE_RATE:.2f} s of audio after the "
                             f"context, so no reference to rate against (use an earlier --start)")
    decoder = FrozenDecoder(codec)
    del codec
    endings = {example.name: {} for example in examples}
    for condition, model, normalizer, _ in models:
        inference.generate(examples, model, normalizer, decoder, windows, settings["batch_size"], device)
        for example in examples:
            endings[example.name][condition["name"]] = example.continuation[:, :continuation_samples]
    normalizer = models[0][2]
    with torch.no_grad():
        for example in examples:
            original = example.original[:, :continuation_samples]
            if target_audio == "original":
                reference = original
            else:
                latents = normalizer.normalize(example.target_latent[None].to(device))
                reference = evaluation.decode_latents(decoder, normalizer, latents)[0, :, :original.shape[-1]]
                endings[example.name][ORIGINAL] = original
            context = normalizer.normalize(example.context_latent[None].to(device)).repeat(1, 1, windows)
            repeat = evaluation.decode_latents(decoder, normalizer, context)[0, :, :continuation_samples]
            endings[example.name][REFERENCE] = reference.float().cpu()
            endings[example.name][REPEAT] = repeat.float().cpu()
            endings[example.name][ANCHOR] = low_pass(reference.float().cpu(), SAMPLE_RATE)
    others = [REFERENCE] + ([ORIGINAL] if target_audio == "codec" else []) + [REPEAT, ANCHOR]
    all_conditions = [{key: c[key] for key in ("name", "kind", "cell", "seed", "checkpoint", "run_id")}
                      for c in conditions]
    all_conditions += [{"name": kind, "kind": kind, "cell": None, "seed": None, "checkpoint": None, "run_id": None}
                       for kind in others]
    return write_test(out_dir, examples, endings, all_conditions, study, {
        "title": settings.get("title") or f"Listening test: {out_dir.resolve().parent.name}/{out_dir.name}",
        "segment_frames": segment_frames, "context_seconds": segment_samples / SAMPLE_RATE,
        "continue_seconds": continuation_samples / SAMPLE_RATE, "lead_in_seconds": settings["lead_in_seconds"],
        "target_audio": target_audio, "encodec_weights": weights, "windows": windows}, SAMPLE_RATE)


def write_test(out_dir: Path, examples: list, endings: dict, conditions: list[dict], study: dict, info: dict,
               sample_rate: int) -> Test:
    """The players and test.json / key.json (written last, atomically); refuses a folder whose ratings belong
    to other conditions."""
    import torch

    from music_continuation.evaluation.inference import PLAYER_PEAK, write_wav
    out_dir.mkdir(parents=True, exist_ok=True)
    token_path = out_dir / TOKEN_FILE
    if token_path.is_file():
        secret = token_path.read_text().strip()
    else:
        secret = secrets.token_urlsafe(18)
        token_path.write_text(secret + "\n")
        token_path.chmod(0o600)
    trials, stimuli, files = [], {}, {}
    for number, example in enumerate(examples, 1):
        trial = f"t{number:02d}"
        before = torch.cat([example.lead_in, example.context_audio], dim=-1)
        players = {name: torch.cat([before, ending], dim=-1) for name, ending in endings[example.name].items()}
        peak = max(float(p.abs().max()) for p in players.values())
        gain = min(1.0, PLAYER_PEAK / peak) if peak > 0 else 1.0
        names = {stimulus_name(secret, trial, c["name"]): c["name"] for c in conditions}
        stimuli[trial] = dict(sorted(names.items()))
        for name, condition in names.items():
            files[f"{AUDIO_DIR}/{trial}/{name}.wav"] = players[condition] * gain
        files[f"{AUDIO_DIR}/{trial}/reference.wav"] = players[REFERENCE] * gain
        trials.append({"id": trial, "source": example.source, "gain": gain,
                       "reference": f"{AUDIO_DIR}/{trial}/reference.wav",
                       "stimuli": {name: f"{AUDIO_DIR}/{trial}/{name}.wav" for name in sorted(names)},
                       "context_start_seconds": example.lead_in.shape[-1] / sample_rate,
                       "seam_seconds": before.shape[-1] / sample_rate,
                       "duration_seconds": max(p.shape[-1] for p in players.values()) / sample_rate})
    digest = test_hash([{k: t[k] for k in ("id", "source", "reference", "stimuli")} for t in trials], stimuli)
    if (out_dir / TEST_FILE).is_file() and (out_dir / RATINGS_DIR).is_dir() \
            and any((out_dir / RATINGS_DIR).glob("*.jsonl")):
        old = read_json(out_dir / TEST_FILE).get("test_hash")
        if old != digest:
            raise StudyError(f"{out_dir} holds ratings of another test (its conditions or windows differ): "
                             f"render into another --out_dir, or move {out_dir / RATINGS_DIR} away")
    shutil.rmtree(out_dir / AUDIO_DIR, ignore_errors=True)
    for relative, audio in files.items():
        (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        write_wav(out_dir / relative, audio)
    write_json(out_dir / KEY_FILE, {"test_hash": digest, "conditions": conditions, "stimuli": stimuli,
                                    "study": study})
    write_json(out_dir / TEST_FILE, {"test_hash": digest, "title": info["title"], "settings": info,
                                     "trials": trials})
    return Test.load(out_dir)
