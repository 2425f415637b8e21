"""One training process of the DDP job (started by train_simple_ddp.py, or by torchrun through it).

Read top to bottom: process-group setup, one epoch, validation, then `run`, which wires it all together, and
`guarded_run`, which turns any failure into one line. The training step and its LR schedule are in step.py, the
state the epoch functions share in context.py, and the epoch's report (printed block, checkpoints, MLflow, audio
samples) in report.py. Every setting comes from the launcher's parsed flags (`args`).

Metrics: every figure is summed as (batch mean x batch size) in device tensors and reduced across
ranks once per epoch (SUM), then divided by the number of examples, so the epoch figures are means
over all examples whatever the number of processes or micro-batches.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from music_continuation.adversarial.adversary import Adversary
from music_continuation.codec import FrozenDecoder, check_fingerprint, codec_fingerprint, load_codec
from music_continuation.data.cache import ContinuationDataset, LatentNormalizer
from music_continuation.evaluation.scoring import (
    BASELINES,
    EvaluationError,
    ScoreSums,
    decode_latents,
    reference_audio,
    score_baselines_batch,
)
from music_continuation.losses.audio import CombinedLoss, adversarial_weighted, weights_from_flags
from music_continuation.losses.balancer import LossBalancer
from music_continuation.model import ContinuationTransformer
from music_continuation.optim.ema import ModelEMA
from music_continuation.training import watchdog
from music_continuation.training.checkpoint import describe_latest, load_checkpoint
from music_continuation.training.context import Context
from music_continuation.training.mlflow_logger import API_FAILURE, close_recorded_run, short
from music_continuation.training.report import Progress, Reporter, announce, start_logger, summary_line

# train_one_epoch calls train_step through this module's name for it, which tests/fault_launcher.py replaces
from music_continuation.training.step import (
    METRIC_NAMES,
    autocast_for,
    build_optimizer,
    stack_metrics,
    to_device,
    train_step,
)
from music_continuation.utils import Interrupted, UserError, exit_now, one_line, strip_exception_prefix, warn

MAX_CONSECUTIVE_SKIPS = 10     # this many non-finite steps in a row end the run: training has diverged
BASELINE_PROGRESS_SECONDS = 10.0   # rank 0 says how far the step-0 baselines are, at most this often
NAMED_BAD_EXAMPLES = 5         # non-finite validation examples named per warning


class TrainingError(UserError, RuntimeError):
    """Training cannot continue (e.g. the loss keeps diverging); the message says why."""


_signals_received = []    # filled by the rank's signal handler (guarded_run); acted on at safe points


def stop_if_signalled() -> None:
    """Raise Interrupted at a safe point (between steps and batches) once SIGINT/SIGTERM has arrived.

    The handler only records the signal: raising from inside it could land in a DataLoader's or a
    library's cleanup code and print its traceback. A rank blocked in a collective is stopped by its
    peers leaving (the collective fails) or, at the latest, by the launcher's SIGKILL.
    """
    if _signals_received:
        raise Interrupted(_signals_received[0])


def setup_distributed(stuck_timeout: float = watchdog.DEFAULT_STUCK_TIMEOUT) -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device) from the env set by torchrun or by the launcher.

    The process group's own timeout (a collective that waits longer raises) is longer than the stuck-rank
    watchdog's longest limit (watchdog.process_group_timeout), so the watchdog's line always comes first."""
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)   # before any CUDA work, so this process never touches GPU 0 by accident
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))   # no oversubscribed cores
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=watchdog.process_group_timeout(stuck_timeout)))
    record_peers(world_size)
    return rank, local_rank, world_size, device


_peers = []    # [(host, pid)] of every rank, by rank: who to look for when this rank's job breaks down


def record_peers(world_size: int) -> None:
    """Every rank's (host, pid), gathered once at start (the same collective on every rank)."""
    table = [None] * world_size
    dist.all_gather_object(table, (socket.gethostname(), os.getpid()))
    _peers[:] = table


def lost_peers() -> list[int]:
    """Ranks on this host whose process is gone (or a zombie): a peer killed or dead without a report.
    Ranks on other hosts cannot be looked at; their loss shows as a failed collective."""
    host, lost = socket.gethostname(), []
    for rank, (peer_host, pid) in enumerate(_peers):
        if peer_host != host or pid == os.getpid():
            continue
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            state = "gone"
        if state in ("gone", "Z", "X"):
            lost.append(rank)
    return lost


COLLECTIVE_FAILURES = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                       "Connection refused")   # what gloo / the store say when a peer's process is gone


def peer_loss_line(error: BaseException, rank: int, checkpoint_dir) -> tuple[bool, str | None]:
    """(a peer was lost, the one line this rank prints or None): the lowest surviving rank on this host says
    which rank was lost, so the line comes once and never blames the rank that prints it."""
    lost = lost_peers()
    collective = isinstance(error, getattr(dist, "DistError", ())) or any(
        text in str(error) for text in COLLECTIVE_FAILURES)
    if not lost and not collective:
        return False, None
    if lost:
        host = socket.gethostname()
        survivors = [r for r, (peer_host, _) in enumerate(_peers) if peer_host == host and r not in lost]
        if rank != min(survivors):
            return True, None
        who = ", ".join(f"rank {r} (pid {_peers[r][1]})" for r in lost)
        what = f"{who} {'was' if len(lost) == 1 else 'were'} lost: killed, or out of memory (see the system log)"
    else:
        what = (f"lost contact with a peer rank ({one_line(error)}): a process on another host died "
                f"or the network failed")
    return True, f"error: {what}; rank {rank} stopped too. {describe_latest(checkpoint_dir)}"


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (a killed launcher or rank leaves no orphans)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # 1 = PR_SET_PDEATHSIG


def loader_worker_init(_worker_id: int, rank_pid: int | None = None) -> None:
    """DataLoader workers are forked from a rank: drop the rank's signal handlers (its rank stops them;
    Ctrl-C in a terminal reaches them too and must not print their tracebacks) and die with the rank.
    A rank that died while this worker was starting is already gone when the death signal is set, so
    the signal would never come: then the parent is no longer the rank (`rank_pid`), and the worker leaves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()
    if rank_pid is not None and os.getppid() != rank_pid:
        os._exit(0)


def spawned_worker(index: int, args, resume_path: str | None, reports) -> None:
    """Entry point of a rank started by the launcher: its index is both rank and local rank."""
    os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(index)
    die_with_parent()
    leave(guarded_run(args, resume_path, reports))


def seed_everything(seed: int, rank: int, epoch: int) -> None:
    """Reseed from (seed, rank, epoch) at every epoch start: dropout differs across ranks, and a resumed run
    draws exactly the numbers an uninterrupted one would, with no RNG state in the checkpoint."""
    state = np.random.SeedSequence([seed, rank, epoch]).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def micro_batch_groups(loader, accum: int):
    """Lists of `accum` consecutive batches (one optimiser step each); a last incomplete group is dropped
    (every rank has the same number of batches, so every rank drops the same)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []


def train_one_epoch(ctx: Context, epoch: int) -> dict:
    """One pass over this rank's shard; returns the epoch means over all ranks' examples, the LR, skips."""
    ctx.model.train()
    ctx.train_sampler.set_epoch(epoch)     # a different shuffle every epoch, identical on every rank
    sums = torch.zeros(len(ctx.metric_names) + 1, device=ctx.device)   # weighted sums ..., example count
    gradient_sums = torch.zeros(ctx.balancer.figure_size(), dtype=torch.float64, device=ctx.device)
    steps = ctx.steps_per_epoch
    bar = tqdm(total=steps, desc=f"Epoch {epoch}/{ctx.args.epochs}", leave=False, file=sys.stderr,
               dynamic_ncols=True, disable=ctx.rank != 0 or not sys.stderr.isatty())
    plain_progress = ctx.rank == 0 and bar.disable
    skipped, lr, started = 0, ctx.optimizer.param_groups[0]["lr"], time.perf_counter()
    windows = list(ctx.train_sampler)      # this rank's windows in loader order: names a bad batch's examples
    for index, group in enumerate(micro_batch_groups(ctx.train_loader, ctx.args.grad_accum_steps)):
        stop_if_signalled()
        watchdog.beat("step", ctx.global_step + 1)     # its batches are here: a stalled loader shows as no beat
        group = [to_device(batch, ctx.device) for batch in group]
        lr = ctx.optimizer.param_groups[0]["lr"]      # the LR this step uses (printed for the epoch's last step)
        if skip_non_finite_data(ctx, group, windows, index):
            skipped += 1
            bar.update()
            continue
        applied, total, components = train_step(ctx.model, ctx.decoder, ctx.normalizer, ctx.loss_fn,
                                                ctx.optimizer, ctx.scheduler, group, ctx.args.grad_clip,
                                                ctx.autocast, ctx.args.target_audio, ctx.balancer,
                                                ctx.adversary, ctx.global_step)
        ctx.global_step += 1
        if applied:
            if ctx.ema is not None:
                ctx.ema.update(ctx.raw_model)
            size = sum(batch["input_latent"].shape[0] for batch in group)
            sums[:-1] += stack_metrics(total, components) * size
            sums[-1] += size
            gradient_sums += ctx.balancer.figures
            ctx.consecutive_skips = 0
        else:
            skipped += 1
            ctx.consecutive_skips += 1
            if ctx.rank == 0:
                what = "loss or gradient" if ctx.adversary is None else "loss, gradient or discriminator value"
                warn(f"step {ctx.global_step}: non-finite {what} on some rank, update "
                     f"skipped on all ranks ({ctx.consecutive_skips} in a row)")
            if ctx.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:   # the same on every rank: all stop together
                raise TrainingError(f"{ctx.consecutive_skips} consecutive steps had a non-finite loss or "
                                    f"gradient (step {ctx.global_step}): training diverged; lower --lr or "
                                    f"--grad_clip, or check the data")
        bar.update()
        if not bar.disable and (index % 10 == 0 or index == steps - 1):
            bar.set_postfix(loss=f"{total.item():.4f}", lr=f"{lr:.2e}")   # synced already by train_step
        if plain_progress and steps >= 20 and (index + 1) % max(1, steps // 10) == 0 and index + 1 < steps:
            print(f"  epoch {epoch}: {index + 1}/{steps} steps, {time.perf_counter() - started:.0f} s",
                  file=sys.stderr, flush=True)
    bar.close()
    means = reduce_means(sums, ctx.metric_names)
    gradients = ctx.balancer.epoch_figures(all_reduce_sum(gradient_sums))
    return {**means, "gradients": gradients, "learning_rate": lr, "skipped_steps": skipped}


def skip_non_finite_data(ctx: Context, group: list, windows: list, step_index: int) -> bool:
    """Before the model sees the step's batches: True (the step skipped on every rank, the LR schedule advanced)
    if any rank's latents or audio hold a non-finite value. One all_reduce (MIN of [all finite, first bad rank]) on
    every rank, every step; the lowest rank with bad data names its examples (track, file, window) in the step's
    one warning."""
    finite = torch.stack([finite_examples(batch) for batch in group])          # [accum, B]
    clean = finite.all()
    verdict = torch.stack([clean.float(), torch.where(clean, float(ctx.world_size), float(ctx.rank))])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
    clean_everywhere, reporter = verdict.tolist()
    if clean_everywhere:
        return False
    if int(reporter) == ctx.rank:
        batch_size = finite.shape[1]
        first = step_index * len(group) * batch_size
        bad = [windows[first + position] for position in (~finite).flatten().nonzero().flatten().tolist()]
        named = "; ".join(ctx.train_set.describe_window(window) for window in bad[:NAMED_BAD_EXAMPLES])
        more = f" and {len(bad) - NAMED_BAD_EXAMPLES} more" if len(bad) > NAMED_BAD_EXAMPLES else ""
        warn(f"step {ctx.global_step + 1} skipped on every rank: rank {ctx.rank}'s batch has non-finite latents or "
             f"audio in {named}{more} (the cache is damaged: python prepare_data.py --verify {ctx.args.data_dir})")
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.scheduler.step()                # the LR is a function of the step, as for a skipped update
    ctx.global_step += 1
    return True


def finite_examples(batch: dict) -> torch.Tensor:
    """[B] bool: the example's latents and audio (and decoded references) are all finite."""
    return torch.stack([torch.isfinite(tensor).flatten(1).all(dim=1) for tensor in batch.values()]).all(dim=0)


def check_trained(train: dict, epoch: int, steps: int) -> None:
    """TrainingError if the epoch trained on nothing (every step skipped) or its training figures are not finite:
    a result made of nothing is not a result. The figures are reduced: every rank raises together."""
    if train["skipped_steps"] >= steps:
        raise TrainingError(f"epoch {epoch}: all {steps} steps were skipped (the warnings above name the data); "
                            f"nothing was trained")
    bad = [name for name in METRIC_NAMES if not math.isfinite(train[name])]
    if bad:
        raise TrainingError(f"epoch {epoch}: the training figures {', '.join(bad)} are not finite")


def reduce_means(sums: torch.Tensor, names: tuple[str, ...] = METRIC_NAMES) -> dict:
    """SUM the (weighted sums, count) vector over ranks once, then divide: means over all examples."""
    sums = all_reduce_sum(sums.clone()).cpu()
    count = sums[-1].item()
    means = sums[:-1] / count if count > 0 else torch.full_like(sums[:-1], float("nan"))
    return dict(zip(names, means.tolist(), strict=True))


def real_val_batches(ctx: Context, phase: str = "validation"):
    """(batch on the device, dataset indices) of this rank's real validation examples.

    DistributedSampler pads the shards to equal length by repeating the first examples. Rank r's i-th
    example is index r + world_size * i of the padded list, so it is real iff that is < len(val_set): only
    a prefix of each rank's shard is real, and the rest is cut off before the model runs.
    """
    real_on_this_rank = len(range(ctx.rank, len(ctx.val_set), ctx.world_size))
    seen = 0
    for batch in ctx.val_loader:
        stop_if_signalled()
        watchdog.beat(phase)
        size = batch["input_latent"].shape[0]
        real = max(0, min(size, real_on_this_rank - seen))
        indices = ctx.val_indices[seen: seen + real]
        seen += size
        if real:
            yield to_device({name: tensor[:real] for name, tensor in batch.items()}, ctx.device), indices


def non_finite_examples(batch: dict, references, output_audio) -> torch.Tensor:
    """Per example: 0 finite, 1 non-finite data (latents or reference audio), 2 non-finite model output."""
    def finite(tensor):
        return torch.isfinite(tensor.float()).flatten(1).all(dim=1)
    data_ok = finite(batch["input_latent"]) & finite(references[0]) & finite(references[1])
    return torch.where(data_ok, torch.where(finite(output_audio), 0, 2), 1)


@torch.no_grad()
def validate(ctx: Context, musical: bool = False) -> tuple[dict | None, int]:
    """(validation figures over every real example of every rank, number of non-finite examples).

    Figures are evaluation.ScoreSums means (loss, the four components, latent_mse, level; with `musical` also
    rhythm, chroma and the listeners'), and with a discriminator its figures (adversarial, feature_matching,
    discriminator_*) of the same examples; None when some example was non-finite: each rank names its own in
    one warning, and the epoch has no validation result. With --ema_decay the model is validated with its
    averaged weights.
    """
    with (ctx.ema.swapped(ctx.raw_model) if ctx.ema is not None else contextlib.nullcontext()):
        return _validate(ctx, musical)


def _validate(ctx: Context, musical: bool) -> tuple[dict | None, int]:
    model = ctx.raw_model      # not the DDP wrapper: validation needs no collectives
    model.eval()
    sums = ScoreSums(ctx.device, "validation")
    adversarial_names = ctx.metric_names[len(METRIC_NAMES):]
    adversarial_sums = torch.zeros(len(adversarial_names), dtype=torch.float64, device=ctx.device)
    bad = []
    for batch, indices in real_val_batches(ctx):
        with ctx.autocast():
            references = reference_audio(batch, ctx.decoder, ctx.normalizer, ctx.args.target_audio)
            prediction = model(batch["input_latent"])
            output_audio = decode_latents(ctx.decoder, ctx.normalizer, prediction)
        status = non_finite_examples(batch, references, output_audio)
        keep = status == 0
        bad += [(index, int(code)) for index, code in zip(indices, status.tolist()) if code]
        if keep.any():
            sums.add(output_audio[keep], (references[0][keep], references[1][keep]), ctx.loss_fn,
                     prediction[keep], batch["target_latent"][keep], musical=musical,
                     listeners=ctx.listeners if musical else None)
            if ctx.adversary is not None:
                figures = ctx.adversary.measure(output_audio[keep], references[0][keep], references[1][keep],
                                                ctx.autocast)
                adversarial_sums += torch.stack([figures[n] for n in adversarial_names]).double() * keep.sum()
    model.train()
    counts = all_reduce_sum(torch.cat([sums.vector(), adversarial_sums,
                                       torch.tensor([float(len(bad))], dtype=torch.float64, device=ctx.device)]))
    if bad:
        warn_non_finite(ctx, bad)
    nonfinite = int(counts[-1].item())
    if nonfinite:
        return None, nonfinite
    score_sums = counts[:-1 - len(adversarial_names)]
    means = ScoreSums.from_vector(score_sums, "validation").means()
    examples = score_sums[0].item()
    means.update(zip(adversarial_names, (counts[len(score_sums):-1] / examples).tolist()))
    return means, nonfinite


def warn_non_finite(ctx: Context, bad: list) -> None:
    reasons = {1: "non-finite latents or reference audio in the cache", 2: "non-finite model output"}
    named = []
    for index, code in bad[:NAMED_BAD_EXAMPLES]:
        track, frame = ctx.val_set.window_location(index)
        named.append(f"track {track} window at frame {frame} ({reasons[code]})")
    more = f" and {len(bad) - NAMED_BAD_EXAMPLES} more" if len(bad) > NAMED_BAD_EXAMPLES else ""
    warn(f"rank {ctx.rank}: {len(bad)} validation example(s) are non-finite: {'; '.join(named)}{more}")


def baseline_figures(ctx: Context) -> dict | None:
    """{silence, repeat, oracle: figures} over the whole validation split (once per run; None if they cannot
    be computed, e.g. non-finite data, which validation then names)."""
    sums = {name: ScoreSums(ctx.device, name) for name in BASELINES}
    started = said = time.perf_counter()
    windows, done = len(ctx.val_set), 0
    for batch, _ in real_val_batches(ctx, "baselines"):
        with ctx.autocast():
            score_baselines_batch(batch, ctx.decoder, ctx.normalizer, ctx.loss_fn, ctx.args.target_audio, sums,
                                  musical=ctx.listeners is not None, listeners=ctx.listeners)
        done += batch["input_latent"].shape[0] * ctx.world_size     # every rank scores a shard of the same size
        if ctx.rank == 0 and time.perf_counter() - said > BASELINE_PROGRESS_SECONDS:
            said = time.perf_counter()
            print(f"  step-0 baselines (silence, repeat, oracle; once per run): {min(done, windows)}/{windows} "
                  f"validation windows, {said - started:.0f} s", file=sys.stderr, flush=True)
    vectors = all_reduce_sum(torch.stack([sums[name].vector() for name in BASELINES]))
    try:
        return {name: ScoreSums.from_vector(vector, name).means() for name, vector in zip(BASELINES, vectors)}
    except EvaluationError as error:
        warn(f"no baselines for this run: {error}")
        return None


def build_loaders(args, rank: int, world_size: int, device: torch.device):
    train_set = ContinuationDataset(args.data_dir, "train", args.segment_frames, args.unity_test)
    val_set = ContinuationDataset(args.data_dir, "val", args.segment_frames, args.unity_test)
    # Same seed on every rank -> one global permutation split into disjoint shards; drop_last keeps
    # every rank at the same number of full batches (a rank with one batch more would hang in DDP).
    train_sampler = DistributedSampler(train_set, world_size, rank, shuffle=True, seed=args.seed, drop_last=True)
    val_sampler = DistributedSampler(val_set, world_size, rank, shuffle=False, drop_last=False)
    loader_options = dict(batch_size=args.batch_size, num_workers=args.num_workers,
                          pin_memory=device.type == "cuda",            # page-locked buffers: faster async copies
                          persistent_workers=args.num_workers > 0,     # no worker re-spawn every epoch
                          worker_init_fn=(functools.partial(loader_worker_init, rank_pid=os.getpid())
                                          if args.num_workers > 0 else None))
    train_loader = DataLoader(train_set, sampler=train_sampler, drop_last=True, **loader_options)
    val_loader = DataLoader(val_set, sampler=val_sampler, **loader_options)
    return train_set, val_set, train_sampler, train_loader, val_loader, list(val_sampler)


def attach_references(train_set, val_set, decoder, device, references_dir=None) -> None:
    """Build (or check, or resume) the cache's decoded references for these windows on every rank together,
    and have both datasets hand them out (references.py)."""
    from music_continuation.data.references import build_references
    references = build_references(train_set.cache_dir, train_set.manifest, decoder, train_set.codec_fingerprint,
                                  train_set.segment_frames, train_set.stride_frames, device,
                                  check_stop=references_progress, references_dir=references_dir)
    train_set.use_references(references)
    val_set.use_references(references)


def references_progress() -> None:
    """Called by build_references between batches: progress for the watchdog, and a safe point to stop."""
    watchdog.beat("references")
    stop_if_signalled()


def build_context(args, resume_state: dict | None) -> Context:
    stuck_timeout = getattr(args, "stuck_timeout", watchdog.DEFAULT_STUCK_TIMEOUT)
    rank, local_rank, world_size, device = setup_distributed(stuck_timeout)
    watchdog.Watchdog(rank, world_size, stuck_timeout, Path(args.checkpoint_dir) / "logs", end_stuck_job)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")   # TF32 matmuls for whatever runs outside autocast
    train_set, val_set, train_sampler, train_loader, val_loader, val_indices = build_loaders(
        args, rank, world_size, device)
    # The frozen decoder is never wrapped in DDP: it has nothing to train.
    codec = load_codec(args.encodec_weights, device)
    check_fingerprint(train_set.codec_fingerprint, codec_fingerprint(codec), f"the cache {args.data_dir}")
    decoder = FrozenDecoder(codec, checkpointing=args.decoder_checkpointing)
    listeners = None
    if args.musical_every:
        from music_continuation.evaluation.listeners import Listeners
        listeners = Listeners(codec, args.beat_tracker, device)    # holds the encoder: the Fréchet distance
    del codec
    if args.target_audio == "codec":   # every segment decoded once (collective), then read, never decoded per step
        attach_references(train_set, val_set, decoder, device, getattr(args, "references_dir", None))
    torch.manual_seed(args.seed)     # the same init on every rank (DDP also broadcasts rank 0's)
    raw_model = ContinuationTransformer(d_model=args.d_model, num_layers=args.num_layers,
                                        num_heads=args.num_heads, dropout=args.dropout).to(device)
    steps_per_epoch = len(train_loader) // args.grad_accum_steps
    schedule_steps = resume_state["schedule_steps"] if resume_state else args.epochs * steps_per_epoch
    optimizer, scheduler = build_optimizer(raw_model, args.lr, args.weight_decay, args.warmup_steps, schedule_steps)
    if resume_state is not None:
        raw_model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
    loss_fn = CombinedLoss(**weights_from_flags(args)).to(device)
    balancer = LossBalancer(loss_fn.weights, args.loss_balancer, args.balancer_ema_decay)
    if resume_state is not None:
        balancer.load_state_dict(resume_state.get("balancer"), device)
    adversary = build_adversary(args, loss_fn.weights, device, resume_state)
    ema = ModelEMA(raw_model, args.ema_decay) if getattr(args, "ema_decay", 0.0) > 0 else None
    if ema is not None and resume_state is not None:
        ema.load_state_dict(resume_state["ema"])
    compiled = torch.compile(raw_model) if args.compile else raw_model   # fused kernels on GPU
    return Context(
        args=args, rank=rank, world_size=world_size, device=device, autocast=autocast_for(device),
        train_set=train_set, val_set=val_set, train_sampler=train_sampler, train_loader=train_loader,
        val_loader=val_loader, val_indices=val_indices, decoder=decoder,
        normalizer=LatentNormalizer(train_set.latent_mean, train_set.latent_std).to(device),
        loss_fn=loss_fn, balancer=balancer, raw_model=raw_model,
        model=DDP(compiled, device_ids=[local_rank] if device.type == "cuda" else None),
        optimizer=optimizer, scheduler=scheduler, schedule_steps=schedule_steps, steps_per_epoch=steps_per_epoch,
        global_step=scheduler.last_epoch, listeners=listeners, adversary=adversary, ema=ema)


def build_adversary(args, weights: dict, device, resume_state: dict | None) -> Adversary | None:
    """The discriminator when an adversarial weight is above 0 (else None: nothing is built), seeded alike on
    every rank, or as the checkpoint left it."""
    if not adversarial_weighted(weights):
        return None
    torch.manual_seed(args.seed + 1)      # its own stream: the model's init is the same with or without it
    adversary = Adversary(device, args.discriminator_lr, args.discriminator_context, args.adversarial_start_step,
                          args.compile, args.discriminator_window_seconds, args.seed)
    if resume_state is not None:
        adversary.load_state_dict(resume_state["discriminator"])
    return adversary


def musical_epoch(args, epoch: int) -> bool:
    """Every --musical_every epochs, and the last epoch, validation also scores the musical figures."""
    return bool(args.musical_every) and (epoch % args.musical_every == 0 or epoch == args.epochs)


def run(args, resume_path: str | None = None) -> None:
    resume_state = load_checkpoint(resume_path) if resume_path else None
    ctx = build_context(args, resume_state)
    progress = Progress.of(resume_state, args.resume_changes)
    reporter = None
    watchdog.beat("start-up")
    if ctx.rank == 0:
        reporter = Reporter(ctx, start_logger(ctx, resume_state, progress.start_epoch))
        _stuck_report.append(reporter)        # end_stuck_job closes its MLflow run
    baselines = baseline_figures(ctx)
    if reporter is not None:
        announce(ctx, reporter.logger, baselines, progress.start_epoch if resume_state else None)
    status = "FAILED"
    try:
        for epoch in range(progress.start_epoch, args.epochs + 1):
            seed_everything(args.seed, ctx.rank, epoch)
            started = time.perf_counter()
            train = train_one_epoch(ctx, epoch)
            check_trained(train, epoch, ctx.steps_per_epoch)
            val, nonfinite = validate(ctx, musical_epoch(args, epoch))
            is_best = progress.record(epoch, train, val)
            if reporter is not None:   # after this epoch's collectives: the others wait for it in the next one
                reporter.epoch(epoch, train, val, nonfinite, baselines, progress, is_best,
                               time.perf_counter() - started)
        status = "FINISHED"
    except Interrupted:
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            expect_worker_deaths()
        watchdog.beat("finishing")
        if reporter is not None:
            reporter.close(status)
    # Every rank ends here together: no rank tears the process group down while rank 0 still uses it.
    dist.barrier()
    watchdog.stop()
    dist.destroy_process_group()
    if progress.best_val_loss == math.inf:
        raise TrainingError("validation was non-finite in every epoch (the warnings above name the examples); "
                            "no best.pt was written")
    if ctx.rank == 0:
        print(summary_line(progress, baselines, args.checkpoint_dir), flush=True)


_stuck_report = []     # [the launcher's queue or None (torchrun), checkpoint dir, rank 0's Reporter once it exists]


def end_stuck_job(what: str, stuck_rank: int) -> NoReturn:
    """The watchdog's end of a stuck job (in its thread; the other ranks of this host are killed already):
    one line, to the launcher (which prints it and stops every rank) or, under torchrun, on stderr."""
    rank = int(os.environ.get("RANK", "0"))
    reports, checkpoint_dir, *reporter = _stuck_report or [None, "."]
    line = f"error: {what}. {describe_latest(checkpoint_dir)}"
    if reports is not None:
        reports.put(("stuck", rank, line))
    else:
        print(line, file=sys.stderr, flush=True)
    if reporter:           # rank 0 acts: its MLflow run is closed here, not left RUNNING
        with contextlib.suppress(Exception):
            reporter[0].logger.finish("FAILED")
        exit_now(1)
    exit_now(watchdog.EXIT_STUCK)


def guarded_run(args, resume_path: str | None, reports=None) -> int:
    """run(), with every failure turned into one line: returns 0 after success, and a failure exits (leave).

    The full traceback goes to CHECKPOINT_DIR/logs/rank<R>.log. Under the launcher (`reports` is its
    queue) the line is reported there and the launcher prints it once; under torchrun this rank prints it.
    SIGINT/SIGTERM unwind the run (MLflow marks it KILLED) and exit 130/143 without a traceback.
    """
    rank = int(os.environ.get("RANK", "0"))
    _stuck_report[:] = [reports, args.checkpoint_dir]
    # A rank that leaves with os._exit (leave) leaves its DataLoader queues' semaphores to the resource
    # tracker, which would warn about each; the tracker this rank may start inherits this -W.
    sys.warnoptions.append("ignore:resource_tracker:UserWarning")
    interrupted = _signals_received
    def on_signal(signum, frame):
        interrupted.append(signum)
        expect_worker_deaths()      # torchrun signals the DataLoader workers too
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        run(args, resume_path)
        if reports is not None:
            reports.put(("done", rank, None))
        return 0
    except BaseException as error:  # noqa: BLE001 - this is the one place every failure is reported
        if reports is None:       # under torchrun: a peer's death reaches us as a failed collective or SIGTERM
            lost, line = peer_loss_line(error, rank, args.checkpoint_dir)
            if lost:
                if line:
                    print(line, file=sys.stderr, flush=True)
                    if 0 in lost_peers():       # rank 0 could not close its MLflow run
                        close_recorded_run(args.checkpoint_dir, "FAILED")
                leave(1)
        if interrupted:           # also errors caused by peers that were stopped at the same moment
            if reports is None and rank == 0:
                print(f"interrupted: {describe_latest(args.checkpoint_dir)}", file=sys.stderr, flush=True)
            leave(128 + interrupted[0])
        log = write_traceback(args.checkpoint_dir, rank)
        message = f"rank {rank}: {error_line(error)} (traceback in {log})"
        if reports is not None:
            reports.put(("error", rank, message))
        else:
            print(f"error: training failed on {message}", file=sys.stderr, flush=True)
        leave(1)


def expect_worker_deaths() -> None:
    """A stopping rank expects its DataLoader workers to die: replace the DataLoader's SIGCHLD handler, which would
    raise 'DataLoader worker ... is killed by signal' into whatever runs next (closing the MLflow run).

    By a handler that does nothing, not SIG_DFL: Python runs pending handlers in signal-number order, so a SIGCHLD
    caught together with the SIGTERM whose handler calls this would find no handler left and print 'OSError:
    Signal 17 ignored due to race condition' with a traceback."""
    with contextlib.suppress(ValueError):      # not the main thread
        signal.signal(signal.SIGCHLD, _ignore_signal)


def _ignore_signal(_signum, _frame) -> None:
    pass


def leave(code: int) -> NoReturn:
    """Every rank exits here, once it has reported and closed its MLflow run: a failed or interrupted one inside
    the except block, a finished one after guarded_run; under the launcher and under torchrun alike.

    os._exit skips the interpreter's teardown: after a success that is 2-3 s of freeing torch per process on 2
    cores (nothing is left to write: checkpoints are on disk, the MLflow run is closed, the streams are flushed
    here). After a failure, unwinding further would also shut the DataLoader workers down one by one (seconds
    each on a busy machine) and print their tracebacks ('DataLoader worker ... is killed by signal: Terminated'
    when torchrun has signalled them). The workers die with the rank (die_with_parent), and a resource tracker
    frees their semaphores (its warnings are off: guarded_run)."""
    watchdog.stop()
    exit_now(code)


def error_line(error: BaseException) -> str:
    """The error in one line. A DataLoader worker's error arrives as 'Caught X in DataLoader worker process N.'
    followed by the worker's traceback, whose last line is the actual error."""
    text = str(error).strip()
    if "Original Traceback" in text:
        return strip_exception_prefix(text.splitlines()[-1])
    if API_FAILURE.search(text):        # MLflow's client quoting urllib3: the URL and the cause are enough
        return short(error)
    return one_line(error)


def write_traceback(checkpoint_dir, rank: int) -> Path | str:
    """Append the current exception's traceback to CHECKPOINT_DIR/logs/rank<R>.log; its path."""
    path = Path(checkpoint_dir) / "logs" / f"rank{rank}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} rank {rank}\n{traceback.format_exc()}\n")
        return path
    except OSError:     # e.g. the disk is full: the traceback then goes to stderr after all
        traceback.print_exc()
        return "stderr above"
