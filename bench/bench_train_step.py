"""Benchmark the training step (the worker's own `train_step`) and the data loader.

    python bench/bench_train_step.py                                  # one step config, JSON line
    python bench/bench_train_step.py --segment_seconds 2 4 8          # memory vs segment length
    python bench/bench_train_step.py --segment_seconds 8 --decoder_checkpointing both
    python bench/bench_train_step.py --loss_balancer true                 # the step with the loss balancer
    python bench/bench_train_step.py --compare_balancer                   # steps without/with it, interleaved
    python bench/bench_train_step.py --compare_adversarial                # without/with the discriminator, interleaved
    python bench/bench_train_step.py --loss_weight_adversarial 0.25 --loss_weight_feature_matching 0.25   # its memory
    python bench/bench_train_step.py --mode loader --data_dir data_cache/demo --num_workers 2
    python bench/bench_train_step.py --target_audio codec                    # references read (stored)
    python bench/bench_train_step.py --target_audio codec --codec_references decoded   # decoded every step

Step mode builds exactly what a rank trains with (ContinuationTransformer, LatentNormalizer, the frozen
EnCodec decoder, CombinedLoss, AdamW + the worker's LR schedule) on synthetic latents and audio, and runs
train_simple_worker.train_step. It prints one JSON line per config with the median step time, audio
seconds trained per wall second, the decoder's forward+backward alone on the same batch (the part no
implementation of this design can avoid), their ratio, the share of each stage (from a second,
instrumented pass that runs the same operations one at a time), what measuring the per-component
gradients at the output audio costs (`loss_gradients`: one autograd.grad per trained component on the loss
graph, against one backward of the weighted sum through the same graph, as the step did before the
measurement; `gradient_measurement_overhead` = their difference over the step) and peak memory (CPU: peak RSS and its
growth during the steps; CUDA: max_memory_allocated). Several configs run in fresh subprocesses so each
peak is its own. The codec is the random one: timings do not depend on the weights' values.
With --target_audio codec the batch carries the decoded references, as the loader hands them out once
references.py has decoded the cache (the path training takes); --codec_references decoded times the
previous path, two decoder forwards per step. --compile compiles the model as the trainer's --compile does.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from music_continuation.adversarial.adversary import Adversary
from music_continuation.codec import FRAME_RATE, HOP_LENGTH, LATENT_DIM, SAMPLE_RATE, FrozenDecoder, load_codec
from music_continuation.data.cache import ContinuationDataset, LatentNormalizer
from music_continuation.evaluation.scoring import decode_latents, reference_audio
from music_continuation.losses.audio import (
    LOSS_COMPONENTS,
    LOSSES,
    CombinedLoss,
    adversarial_weighted,
    weights_from_flags,
)
from music_continuation.losses.balancer import LossBalancer
from music_continuation.model import ContinuationTransformer
from music_continuation.settings import DISCRIMINATOR_DEFAULTS
from music_continuation.training.launcher import parse_bool
from music_continuation.training.step import autocast_for, build_optimizer, optimizer_update, to_device, train_step


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("step", "loader"), default="step")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--segment_seconds", type=float, nargs="+", default=[2.0])
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=4)
    for component in LOSSES:   # default: every reference component trained; the discriminator only when asked
        parser.add_argument(component.flag, type=float, default=0.0 if component.adversarial else 0.25,
                            help=component.help)
    parser.add_argument("--grad_clip", type=float, default=1.0)
    parser.add_argument("--loss_balancer", type=parse_bool, default=False, help="as the launcher's flag")
    parser.add_argument("--compare_balancer", action="store_true",
                        help="also time --steps steps without and with the balancer, alternating in this process "
                             "(robust to a machine whose load drifts): their medians and ratio")
    parser.add_argument("--compare_adversarial", action="store_true",
                        help="also time --steps steps without and with the discriminator (adversarial and feature "
                             "matching at 0.25 each, beside the reference weights), alternating in this process: "
                             "their medians and ratio")
    parser.add_argument("--discriminator_window_seconds", type=float,
                        default=DISCRIMINATOR_DEFAULTS["discriminator_window_seconds"], help="as the launcher's flag")
    parser.add_argument("--target_audio", choices=("original", "codec"), default="original",
                        help="codec: the references are the decoder's audio of the true latents")
    parser.add_argument("--codec_references", choices=("stored", "decoded"), default="stored",
                        help="with --target_audio codec: stored = read with the batch, as training does "
                             "(references.py); decoded = decoded every step (the previous path)")
    parser.add_argument("--decoder_checkpointing", choices=("off", "on", "both"), default="off")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (the trainer's --compile)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data_dir", help="loader mode: a prepared cache")
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=50, help="loader mode: batches to time")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ helpers

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    synchronize(device)
    started = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - started, result


def current_rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # kilobytes on Linux


def synthetic_batch(batch_size: int, frames: int, device: torch.device, stored_references: bool = False) -> dict:
    """A batch as the loader hands it out; with stored_references also the decoded references that a dataset
    with references.ReferenceSet attached carries (their values do not matter for the timing)."""
    samples = frames * HOP_LENGTH
    batch = {"input_latent": torch.randn(batch_size, LATENT_DIM, frames),
             "target_latent": torch.randn(batch_size, LATENT_DIM, frames),
             "input_audio": 0.1 * torch.randn(batch_size, 1, samples),
             "target_audio": 0.1 * torch.randn(batch_size, 1, samples)}
    if stored_references:
        batch.update(input_reference=0.1 * torch.randn(batch_size, 1, samples),
                     target_reference=0.1 * torch.randn(batch_size, 1, samples))
    if device.type == "cuda":
        batch = {name: tensor.pin_memory() for name, tensor in batch.items()}
    return batch


# ------------------------------------------------------------------------------------------ step mode

def build_training_parts(args, frames: int, checkpointing: bool, device: torch.device):
    """The objects a rank trains with, as train_simple_worker.run builds them (minus DDP: one process)."""
    decoder = FrozenDecoder(load_codec("random", device), checkpointing=checkpointing)
    normalizer = LatentNormalizer(torch.zeros(LATENT_DIM), torch.ones(LATENT_DIM)).to(device)
    loss_fn = CombinedLoss(**weights_from_flags(args)).to(device)
    torch.manual_seed(0)
    model = ContinuationTransformer(d_model=args.d_model, num_layers=args.num_layers,
                                    num_heads=args.num_heads, dropout=0.0).to(device)
    optimizer, scheduler = build_optimizer(model, lr=1e-4, weight_decay=0.01, warmup_steps=10, total_steps=1000)
    if args.compile:
        model = torch.compile(model)
    balancer = LossBalancer(loss_fn.weights, args.loss_balancer)
    adversary = build_adversary(args, loss_fn.weights, device)
    return model, decoder, normalizer, loss_fn, optimizer, scheduler, autocast_for(device), balancer, adversary


def build_adversary(args, weights: dict, device) -> Adversary | None:
    """The trainer's discriminator (AudioCraft's configuration and Adam) when an adversarial weight is > 0."""
    if not adversarial_weighted(weights):
        return None
    torch.manual_seed(1)
    return Adversary(device, lr=DISCRIMINATOR_DEFAULTS["discriminator_lr"], compile=args.compile,
                     window_seconds=args.discriminator_window_seconds)


def stage_times(parts, host_batch, device, grad_clip: float, target_audio: str) -> dict:
    """The step's operations one at a time, each timed (same order and work as train_step), and one backward
    of the weighted sum through the same loss graph (`single_loss_backward`: what the step cost before it
    measured each component's gradient; not part of the step)."""
    model, decoder, normalizer, loss_fn, optimizer, scheduler, autocast, balancer, adversary = parts
    times = {}
    times["data"], batch = timed(lambda: to_device(host_batch, device), device)
    with autocast():
        times["references"], references = timed(
            lambda: reference_audio(batch, decoder, normalizer, target_audio), device)
        times["model_forward"], prediction = timed(lambda: model(batch["input_latent"]), device)
        times["decoder_forward"], output = timed(lambda: decode_latents(decoder, normalizer, prediction), device)
    audio = output.detach().float().requires_grad_(True)
    times["losses"], terms = timed(lambda: loss_fn.terms(audio, *references), device)
    if adversary is not None:      # its forward on [generated; reference] and its own backward
        def discriminator():
            figures = adversary.terms(audio, *references, autocast, step=0)
            adversary.backward(figures["discriminator_loss"], 1.0)
            return figures
        times["discriminator"], figures = timed(discriminator, device)
        terms.update(figures)
    balancer.start_step()
    times["loss_gradients"], gradient = timed(
        lambda: balancer.gradient({name: terms[name] for name in balancer.names}, audio), device)
    times["backward"], _ = timed(lambda: output.backward(gradient.to(output.dtype)), device)
    total = loss_fn.weighted_sum(terms).detach()
    def update():
        finite = balancer.finite
        if adversary is not None:
            finite = adversary.reduce_gradients() if finite is None else finite & adversary.reduce_gradients()
        applied = optimizer_update(model, optimizer, scheduler, total, grad_clip, finite)
        if adversary is not None:
            adversary.step(applied)
    times["optimizer"], _ = timed(update, device)
    balancer.end_step(True)
    again = audio.detach().requires_grad_(True)
    single_total = loss_fn.weighted_sum(loss_fn.terms(again, *references))
    single, _ = timed(lambda: torch.autograd.grad(single_total, again), device)
    return times, single


def decoder_alone(decoder, batch, device) -> float:
    """Forward + backward of the frozen decoder only, on latents of the batch's shape."""
    latents = batch["input_latent"].detach().clone().requires_grad_(True)

    def run():
        decoder(latents).square().mean().backward()
    seconds, _ = timed(run, device)
    return seconds


def compare_balancer(args, parts, host_batch, device) -> dict:
    """Median step time without and with the balancer, the two alternating step by step."""
    model, decoder, normalizer, loss_fn, optimizer, scheduler, autocast, _, _ = parts
    balancers = {False: LossBalancer(loss_fn.weights, False), True: LossBalancer(loss_fn.weights, True)}
    times = {False: [], True: []}
    for _ in range(args.steps):
        for balance, balancer in balancers.items():
            seconds, _ = timed(lambda b=balancer: train_step(
                model, decoder, normalizer, loss_fn, optimizer, scheduler, to_device(host_batch, device),
                grad_clip=args.grad_clip, autocast_ctx=autocast, target_audio=args.target_audio, balancer=b), device)
            times[balance].append(seconds)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    return {"step_seconds_balancer_off": round(off, 4), "step_seconds_balancer_on": round(on, 4),
            "balancer_step_ratio": round(on / off, 4)}


def compare_adversarial(args, parts, host_batch, device) -> dict:
    """Median step time without and with the discriminator, the two alternating step by step (same model)."""
    model, decoder, normalizer, loss_fn, optimizer, scheduler, autocast, _, _ = parts
    reference = {name: weight for name, weight in loss_fn.weights.items() if name in LOSS_COMPONENTS}
    configs = {}
    for on in (False, True):
        weights = {**reference, **({"adversarial": 0.25, "feature_matching": 0.25} if on else {})}
        fn = CombinedLoss(**weights).to(device)
        configs[on] = (fn, LossBalancer(fn.weights, args.loss_balancer),
                       build_adversary(args, fn.weights, device))
    times = {False: [], True: []}
    for index in range(args.warmup + args.steps):
        for on, (fn, balancer, adversary) in configs.items():
            seconds, _ = timed(lambda f=fn, b=balancer, a=adversary: train_step(
                model, decoder, normalizer, f, optimizer, scheduler, to_device(host_batch, device),
                grad_clip=args.grad_clip, autocast_ctx=autocast, target_audio=args.target_audio, balancer=b,
                adversary=a), device)
            if index >= args.warmup:
                times[on].append(seconds)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    return {"step_seconds_adversarial_off": round(off, 4), "step_seconds_adversarial_on": round(on, 4),
            "adversarial_step_ratio": round(on / off, 4),
            "discriminator_parameters": sum(p.numel() for p in configs[True][2].parameters)}


def bench_step(args, segment_seconds: float, checkpointing: bool) -> dict:
    device = torch.device(args.device)
    frames = round(segment_seconds * FRAME_RATE)
    parts = build_training_parts(args, frames, checkpointing, device)
    model, decoder, normalizer, loss_fn, optimizer, scheduler, autocast, balancer, adversary = parts
    stored = args.target_audio == "codec" and args.codec_references == "stored"
    host_batch = synthetic_batch(args.batch_size, frames, device, stored_references=stored)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = current_rss_mb()

    step_times = []
    for index in range(args.warmup + args.steps):
        seconds, _ = timed(lambda: train_step(model, decoder, normalizer, loss_fn, optimizer, scheduler,
                                              to_device(host_batch, device), grad_clip=args.grad_clip,
                                              autocast_ctx=autocast, target_audio=args.target_audio,
                                              balancer=balancer, adversary=adversary), device)
        if index >= args.warmup:
            step_times.append(seconds)
    peak = peak_rss_mb() if device.type == "cpu" else torch.cuda.max_memory_allocated(device) / 2**20
    batch = to_device(host_batch, device)
    with autocast():
        decoder_times = [decoder_alone(decoder, batch, device) for _ in range(args.steps)]
    runs = [stage_times(parts, host_batch, device, args.grad_clip, args.target_audio) for _ in range(args.steps)]
    stages = [times for times, _ in runs]
    stage_medians = {name: statistics.median(run[name] for run in stages) for name in stages[0]}
    stage_sum = sum(stage_medians.values())
    single_backward = statistics.median(single for _, single in runs)

    comparison = compare_balancer(args, parts, host_batch, device) if args.compare_balancer else {}
    if args.compare_adversarial:
        comparison.update(compare_adversarial(args, parts, host_batch, device))

    step = statistics.median(step_times)
    decode = statistics.median(decoder_times)
    return {
        "device": device.type, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "segment_seconds": segment_seconds, "segment_frames": frames, "d_model": args.d_model,
        "num_layers": args.num_layers, "loss_weights": weights_from_flags(args), "target_audio": args.target_audio,
        "codec_references": args.codec_references if args.target_audio == "codec" else None,
        "decoder_checkpointing": checkpointing, "compile": args.compile,
        "model_parameters": sum(parameter.numel() for parameter in model.parameters()),
        "step_seconds": round(step, 4),
        "audio_seconds_per_second": round(args.batch_size * frames * HOP_LENGTH / SAMPLE_RATE / step, 3),
        "decoder_fwd_bwd_seconds": round(decode, 4),
        "step_over_decoder": round(step / decode, 3),
        "loss_balancer": args.loss_balancer, "discriminator": adversary is not None,
        "discriminator_window_seconds": args.discriminator_window_seconds,
        "stage_share": {name: round(value / stage_sum, 3) for name, value in stage_medians.items()},
        "loss_gradients_seconds": round(stage_medians["loss_gradients"], 4),
        "single_loss_backward_seconds": round(single_backward, 4),
        "gradient_measurement_overhead": round((stage_medians["loss_gradients"] - single_backward) / stage_sum, 4),
        "peak_memory_mb": round(peak, 1),
        "step_memory_growth_mb": round(peak - rss_before, 1) if device.type == "cpu" else round(peak, 1),
        **comparison,
    }


# ---------------------------------------------------------------------------------------- loader mode

def bench_loader(args, segment_seconds: float) -> dict:
    if not args.data_dir:
        sys.exit("bench_train_step.py: --mode loader needs --data_dir (a cache made by prepare_data.py)")
    frames = round(segment_seconds * FRAME_RATE)
    dataset = ContinuationDataset(args.data_dir, "train", frames)
    if args.target_audio == "codec" and args.codec_references == "stored":   # read the references too
        from music_continuation.data.references import build_references
        codec = load_codec(dataset.encodec_weights, "cpu")
        dataset.use_references(build_references(args.data_dir, dataset.manifest, FrozenDecoder(codec),
                                                dataset.codec_fingerprint, frames))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.num_workers, drop_last=True,
                                         persistent_workers=args.num_workers > 0)
    def fresh_batches():
        # a new pass whenever one ends: itertools.cycle would replay stored batches and time nothing
        while True:
            yield from loader
    batches = fresh_batches()
    next(batches)                                   # worker start-up is not part of the steady rate
    started = time.perf_counter()
    for _ in range(args.batches):
        next(batches)
    seconds = time.perf_counter() - started
    return {"mode": "loader", "data_dir": args.data_dir, "num_workers": args.num_workers,
            "batch_size": args.batch_size, "segment_frames": frames, "examples": len(dataset),
            "references": dataset.references is not None,
            "examples_per_second": round(args.batches * args.batch_size / seconds, 1)}


# ------------------------------------------------------------------------------------------- main

def main(argv=None) -> None:
    args = parse_args(argv)
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.decoder_checkpointing]
    configs = [(seconds, flag) for seconds in args.segment_seconds for flag in checkpointing]
    if args.mode == "loader":
        for seconds in args.segment_seconds:
            print(json.dumps(bench_loader(args, seconds)), flush=True)
        return
    if len(configs) == 1:
        print(json.dumps(bench_step(args, *configs[0])), flush=True)
        return
    # One subprocess per config: peak RSS only ever grows within a process.
    argv = list(sys.argv[1:] if argv is None else argv)
    for seconds, flag in configs:
        child = _without_options(argv, ("--segment_seconds", "--decoder_checkpointing"))
        child += ["--segment_seconds", str(seconds), "--decoder_checkpointing", "on" if flag else "off"]
        subprocess.run([sys.executable, __file__, *child], check=True)


def _without_options(argv: list, names: tuple) -> list:
    kept, skipping = [], False
    for token in argv:
        if token.startswith("--"):
            skipping = token in names
        if not skipping:
            kept.append(token)
    return kept


if __name__ == "__main__":
    main()
