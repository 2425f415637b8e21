"""Scoring continuations the same way everywhere: validation, evaluate.py, inference_sample.py, ablations.

Every figure is computed here, once, from sums and counts (class ScoreSums), so it reduces across DDP
ranks with one all_reduce(SUM) and means the same in every table. For a batch of output audio
[B, 1, N] against the reference input and target audio:

    loss, rms_input, rms_target, spectral, mel   losses.CombinedLoss with the run's weights (all four
                                   components always; loss = their weighted sum). Accumulated as
                                   batch value x batch size, as the trainer does (spectral convergence
                                   is a ratio over the batch, so it moves slightly with the batch size).
    latent_mse   mean_b mean_{c,t} (p[b,c,t] - y[b,c,t])^2 of the NORMALISED predicted latents p against
                 the normalised target latents y; None where there are no latents (silence).
    level        sqrt( sum_b mean_n out[b,n]^2 / sum_b mean_n tgt[b,n]^2 ) = RMS(output) / RMS(target)
                 over the whole set: 1 is right, 0 is collapse to silence. None if the target is silent.
    rhythm, chroma   listening_metrics.listening_metrics(out[b], tgt[b]) averaged over examples
                 (expensive: only with musical=True, else None).
    melody_f1, pitch_class_agreement, beat_f1   the pretrained listeners (listeners/), averaged over examples;
                 tempo_ratio averaged over the examples where both sides have two beats after the seam;
    frechet_codec    the Fréchet distance of the output set against the reference set of codec frames.
                 Only when a listeners.Listeners is passed (else None); beats are tracked on input + output.

Reference audio (target_audio):
    "original"  the real audio of the windows (the cache's audio).
    "codec"     what the frozen decoder makes of the windows' TRUE latents, decoded exactly as the
                model's predictions are: the best any latent prediction can reach through this codec,
                so a perfect prediction scores exactly 0. "auto" is "codec" with the random codec
                (its decoder cannot reproduce the original audio at all), "original" otherwise.

Baselines, scored through the same code:
    silence  output = zeros                                     (no latents)
    repeat   predicted latents = the input window's latents     (the context played again)
    oracle   predicted latents = the target window's latents    (latent_mse 0)

    skill = (S_repeat - S_model) / (S_repeat - S_oracle)  per figure: 1 = as good as the oracle,
    0 = no better than repeating the context, < 0 = worse. Defined for loss, the four components,
    latent_mse, rhythm, chroma and the listeners' figures but tempo_ratio (the formula needs no "lower is
    better": the oracle is the reference either way); for rms_input it only places the model between repeat
    (which is the input) and oracle. Never for level or tempo_ratio (their ideal is 1, not the oracle's
    value). None when a figure is None or S_repeat == S_oracle (e.g. unity mode, where repeat is the oracle).

A figure is never NaN: non-finite sums raise EvaluationError naming the figure; undefined ones are None.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch

from music_continuation.evaluation.listeners import LISTENER_FIGURES
from music_continuation.evaluation.listeners.frechet import STATS_SIZE, FrechetError, frechet_distance
from music_continuation.evaluation.listening_metrics import listening_metrics
from music_continuation.losses.audio import LOSS_COMPONENTS, CombinedLoss, check_weights
from music_continuation.settings import BASELINES
from music_continuation.utils import UserError

TARGET_AUDIO_CHOICES = ("auto", "original", "codec")
SCORE_NAMES = ("loss", "rms_input", "rms_target", "spectral", "mel", "latent_mse", "level", "rhythm",
               "chroma") + LISTENER_FIGURES
SKILL_NAMES = ("loss", "rms_input", "rms_target", "spectral", "mel", "latent_mse", "rhythm", "chroma",
               "melody_f1", "pitch_class_agreement", "beat_f1", "frechet_codec")
LOSS_FIGURES = ("loss",) + LOSS_COMPONENTS
# The fixed order of ScoreSums.vector(): a count, then the sums that are divided by it.
SUM_FIELDS = ("examples", "loss", "rms_input", "rms_target", "spectral", "mel", "output_power", "target_power",
              "latent_examples", "latent_mse", "musical_examples", "rhythm", "chroma",
              "listener_examples", "melody_f1", "pitch_class_agreement", "beat_f1", "tempo_examples", "tempo_ratio")
# vector() is SUM_FIELDS, then the Fréchet sets of the outputs and of the references (frechet.frame_stats each).
VECTOR_SIZE = len(SUM_FIELDS) + 2 * STATS_SIZE
_refusals_shown: set = set()     # each Fréchet refusal is printed once per process, not once per row


class EvaluationError(UserError, ValueError):
    """A figure cannot be computed (non-finite values, nothing to evaluate); the message is one line."""


# --------------------------------------------------------------------------------- audio to score

def resolve_target_audio(choice: str, encodec_weights: str | None) -> str:
    """'auto' -> 'codec' with the 'random' codec, 'original' otherwise; 'original'/'codec' unchanged."""
    if choice not in TARGET_AUDIO_CHOICES:
        raise ValueError(f"--target_audio must be one of {', '.join(TARGET_AUDIO_CHOICES)}, got {choice!r}")
    if choice == "auto":
        return "codec" if encodec_weights == "random" else "original"
    return choice


def decode_latents(decoder, normalizer, latents: torch.Tensor) -> torch.Tensor:
    """audio = decoder(normalizer.denormalize(latents)): normalised latents [B, 128, T] -> [B, 1, T * 320]."""
    return decoder(normalizer.denormalize(latents))


def predict_audio(model, normalizer, decoder, latents: torch.Tensor) -> torch.Tensor:
    """The model's continuation as audio: decoder(normalizer.denormalize(model(latents))) (autograd as the caller's)."""
    return decode_latents(decoder, normalizer, model(latents))


@torch.no_grad()
def decode_windows(batch: dict, decoder, normalizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoded input_latent, decoded target_latent), each window alone, as predictions are decoded.

    When target_latent equals input_latent (unity mode) the one decoded tensor serves both, so
    repeat and oracle are the same audio bit for bit. A batch from a dataset with decoded references
    (references.py) carries both already ("input_reference", "target_reference"): they are used, not decoded.
    """
    if "input_reference" in batch:
        return batch["input_reference"], batch["target_reference"]
    decoded_input = decode_latents(decoder, normalizer, batch["input_latent"])
    if torch.equal(batch["target_latent"], batch["input_latent"]):
        return decoded_input, decoded_input
    return decoded_input, decode_latents(decoder, normalizer, batch["target_latent"])


def reference_audio(batch: dict, decoder, normalizer, target_audio: str,
                    decoded: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_audio, target_audio) to score against: the batch's audio ('original') or decode_windows ('codec').

    Pass `decoded` (from decode_windows) to reuse one decode: the oracle's output must be the very tensor
    it is scored against for it to score exactly 0 (decoding in another batch can differ in the last bits).
    """
    if target_audio == "original":
        return batch["input_audio"], batch["target_audio"]
    if target_audio == "codec":
        return decoded if decoded is not None else decode_windows(batch, decoder, normalizer)
    raise ValueError(f"target_audio must be 'original' or 'codec' (resolve 'auto' first), got {target_audio!r}")


# ------------------------------------------------------------------------------------------- sums

def _f64(value, device) -> torch.Tensor:
    if torch.is_tensor(value):
        return value.detach().to(device=device, dtype=torch.float64).reshape(())
    return torch.tensor(float(value), dtype=torch.float64, device=device)


class ScoreSums:
    """Sums and counts of the figures over examples (module docstring); `means()` turns them into figures.

    `vector()` is a float64 tensor of VECTOR_SIZE on `device` (SUM_FIELDS, then the two Fréchet sets): all_reduce
    it with SUM across ranks, then `ScoreSums.from_vector(v).means()`. `a + b` adds two sets of sums.
    """

    def __init__(self, device="cpu", label: str = "scores"):
        self.sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=device)
        self.frechet = torch.zeros(2, STATS_SIZE, dtype=torch.float64, device=device)   # outputs, references
        self.label = label

    @classmethod
    def from_vector(cls, vector: torch.Tensor, label: str = "scores") -> ScoreSums:
        if vector.shape != (VECTOR_SIZE,):
            raise ValueError(f"a ScoreSums vector has {VECTOR_SIZE} entries (SUM_FIELDS {SUM_FIELDS} and two Fréchet "
                             f"sets), got {list(vector.shape)}")
        sums = cls(vector.device, label)
        vector = vector.detach().to(torch.float64)
        sums.sums = vector[:len(SUM_FIELDS)].clone()
        sums.frechet = vector[len(SUM_FIELDS):].reshape(2, STATS_SIZE).clone()
        return sums

    def vector(self) -> torch.Tensor:
        return torch.cat([self.sums, self.frechet.reshape(-1)])

    def __add__(self, other: ScoreSums) -> ScoreSums:
        return ScoreSums.from_vector(self.vector() + other.vector().to(self.sums.device), self.label)

    @property
    def examples(self) -> int:
        return int(self.sums[0].item())

    @torch.no_grad()
    def add(self, output_audio: torch.Tensor, references: tuple[torch.Tensor, torch.Tensor], loss_fn: CombinedLoss,
            predicted_latent: torch.Tensor | None = None, target_latent: torch.Tensor | None = None,
            musical: bool = False, losses: tuple | None = None, listeners=None) -> ScoreSums:
        """Add one batch: output audio [B, 1, N] against references (input_audio, target_audio).

        `losses` = the (total, components) loss_fn already returned for exactly these tensors (saves
        computing them twice). latent_mse is added when both latents are given (normalised, [B, 128, T]).
        No host synchronisation unless musical=True (rhythm and chroma are computed on the CPU) or
        `listeners` (a listeners.Listeners) is given: then its figures too, beats tracked on input + output.
        """
        input_audio, target_audio = references
        size = output_audio.shape[0]
        total, components = losses if losses is not None else loss_fn(output_audio, input_audio, target_audio)
        out = output_audio.detach().float().reshape(size, -1)
        tgt = target_audio.detach().float().reshape(size, -1)
        row = {"examples": size, "loss": total * size, "output_power": out.square().mean(dim=1).sum(),
               "target_power": tgt.square().mean(dim=1).sum()}
        row.update({name: components[name] * size for name in LOSS_COMPONENTS})
        if predicted_latent is not None and target_latent is not None:
            error = (predicted_latent.detach().float() - target_latent.detach().float()).square()
            row.update(latent_examples=size, latent_mse=error.mean(dim=(1, 2)).sum())
        if musical:
            figures = [listening_metrics(o, t) for o, t in zip(out.cpu(), tgt.cpu())]
            row.update(musical_examples=size, rhythm=sum(f["rhythm"] for f in figures),
                       chroma=sum(f["chroma"] for f in figures))
        device = self.sums.device
        if listeners is not None:
            heard = listeners.batch_sums(output_audio, input_audio, target_audio)
            if "frechet_output" in heard:
                self.frechet += torch.stack([heard.pop("frechet_output"), heard.pop("frechet_reference")]).to(device)
            row.update(heard)
        self.sums += torch.stack([_f64(row.get(name, 0.0), device) for name in SUM_FIELDS])
        return self

    def means(self) -> dict:
        """{name: figure or None} in SCORE_NAMES order (formulas in the module docstring)."""
        s = dict(zip(SUM_FIELDS, self.sums.cpu().tolist()))
        bad = [name for name in SUM_FIELDS if not math.isfinite(s[name])]
        bad += ["frechet_codec"] if not bool(torch.isfinite(self.frechet).all()) else []
        if bad:
            raise EvaluationError(f"{self.label}: the sums of {', '.join(bad)} are not finite (NaN or inf): the "
                                  f"output audio or latents hold non-finite values (a diverged model?)")

        def ratio(total: str, count: str):
            return s[total] / s[count] if s[count] > 0 else None

        figures = {name: ratio(name, "examples") for name in LOSS_FIGURES}
        figures["latent_mse"] = ratio("latent_mse", "latent_examples")
        figures["level"] = (math.sqrt(s["output_power"] / s["target_power"])
                            if s["examples"] > 0 and s["target_power"] > 0 else None)
        figures["rhythm"] = ratio("rhythm", "musical_examples")
        figures["chroma"] = ratio("chroma", "musical_examples")
        for name in ("melody_f1", "pitch_class_agreement", "beat_f1"):
            figures[name] = ratio(name, "listener_examples")
        figures["tempo_ratio"] = ratio("tempo_ratio", "tempo_examples")
        figures["frechet_codec"] = self._frechet_codec()
        return {name: figures[name] for name in SCORE_NAMES}

    def _frechet_codec(self) -> float | None:
        """None when no frames were added or too few (the refusal is printed once, as one line)."""
        if self.frechet[0, 0] == 0:
            return None
        try:
            return frechet_distance(self.frechet[0], self.frechet[1])
        except FrechetError as error:
            if str(error) not in _refusals_shown:
                _refusals_shown.add(str(error))
                print(f"warning: {error}", file=sys.stderr, flush=True)
            return None


# -------------------------------------------------------------------------------- batch scoring

@torch.no_grad()
def score_model_batch(model, batch: dict, decoder, normalizer, loss_fn: CombinedLoss,
                      references: tuple[torch.Tensor, torch.Tensor], sums: ScoreSums | None = None,
                      musical: bool = False, listeners=None) -> ScoreSums:
    """Add the model's figures on one batch to `sums` (a new ScoreSums if None) and return it.

    prediction p = model(input_latent); output = predict_audio; scored against `references`
    (from reference_audio), latent_mse of p against target_latent.
    """
    sums = ScoreSums(batch["input_latent"].device, "model") if sums is None else sums
    prediction = model(batch["input_latent"])
    output = decode_latents(decoder, normalizer, prediction)
    return sums.add(output, references, loss_fn, prediction, batch["target_latent"], musical, listeners=listeners)


def baseline_outputs(batch: dict, decoded: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """{baseline: (output audio, predicted latents or None)}; `decoded` from decode_windows."""
    decoded_input, decoded_target = decoded
    return {"silence": (torch.zeros_like(decoded_target), None),
            "repeat": (decoded_input, batch["input_latent"]),
            "oracle": (decoded_target, batch["target_latent"])}


@torch.no_grad()
def score_baselines_batch(batch: dict, decoder, normalizer, loss_fn: CombinedLoss, target_audio: str,
                          sums: dict | None = None, musical: bool = False,
                          decoded: tuple[torch.Tensor, torch.Tensor] | None = None, listeners=None) -> dict:
    """Add silence, repeat and oracle on one batch to `sums` ({name: ScoreSums}, new if None); returns it.

    The windows' latents are decoded once (or `decoded` is reused) and serve as the baselines' outputs
    and, with target_audio 'codec', as the references.
    """
    device = batch["input_latent"].device
    sums = {name: ScoreSums(device, name) for name in BASELINES} if sums is None else sums
    decoded = decode_windows(batch, decoder, normalizer) if decoded is None else decoded
    references = reference_audio(batch, decoder, normalizer, target_audio, decoded)
    for name, (output, latents) in baseline_outputs(batch, decoded).items():
        sums[name].add(output, references, loss_fn, latents, batch["target_latent"], musical, listeners=listeners)
    return sums


def score_baselines(batches, decoder, normalizer, loss_fn: CombinedLoss, target_audio: str,
                    musical: bool = False, listeners=None) -> dict:
    """{baseline: ScoreSums} over an iterable of batches (e.g. one rank's shard, once per run).

    Batches are moved to the normaliser's device; all_reduce each `.vector()` to combine ranks.
    """
    device = normalizer.mean.device
    sums = {name: ScoreSums(device, name) for name in BASELINES}
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        score_baselines_batch(batch, decoder, normalizer, loss_fn, target_audio, sums, musical, listeners=listeners)
    return sums


def skill(model: dict, repeat: dict, oracle: dict) -> dict:
    """{name: (repeat - model) / (repeat - oracle)} for SKILL_NAMES; None elsewhere, for None figures
    and where repeat == oracle. 1 = as good as the oracle, 0 = as repeating the context, < 0 worse."""
    result = dict.fromkeys(SCORE_NAMES)
    for name in SKILL_NAMES:
        m, r, o = model.get(name), repeat.get(name), oracle.get(name)
        if m is None or r is None or o is None or r == o:
            continue
        value = (r - m) / (r - o)
        if not math.isfinite(value):
            raise EvaluationError(f"skill of {name} is not finite: model {m}, repeat {r}, oracle {o}")
        result[name] = value
    return result


# ------------------------------------------------------------------------------------ checkpoints

def select_windows(count: int, max_windows: int | None) -> list[int]:
    """Window indices evenly spaced over `count` windows, first and last included (all if max_windows is None).

    A function of (count, max_windows) only, so every checkpoint on the same cache and segment length
    is scored on the same windows.
    """
    if max_windows is None or max_windows >= count:
        return list(range(count))
    if max_windows < 1:
        raise ValueError(f"--max_windows must be at least 1, got {max_windows}")
    return sorted({int(i) for i in np.linspace(0, count - 1, max_windows).round()})


def loss_weights_of(args: dict) -> dict:
    """The run's loss weights {component: weight} from its flags (defaults where a flag is missing), of the
    components it shows: the adversarial ones only where it trained them."""
    from music_continuation.losses.audio import LOSSES, shown_losses
    weights = check_weights({c.name: args.get(c.flag[2:], c.default) for c in LOSSES})
    return {c.name: weights[c.name] for c in shown_losses(weights)}


def _batches(dataset, indices: list[int], batch_size: int, device, renormalize):
    for first in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[first: first + batch_size]]
        batch = {key: torch.stack([item[key] for item in items]).to(device) for key in items[0]}
        if renormalize is not None:
            batch["input_latent"] = renormalize(batch["input_latent"])
            batch["target_latent"] = renormalize(batch["target_latent"])
        yield batch


def _renormalizer(dataset, normalizer):
    """None if the cache's statistics are the checkpoint's, else a function mapping cache-normalised latents to
    checkpoint-normalised ones."""
    mean, std = dataset.latent_mean.reshape(1, -1, 1), dataset.latent_std.reshape(1, -1, 1)
    if torch.equal(mean, normalizer.mean.cpu()) and torch.equal(std, normalizer.std.cpu()):
        return None
    mean, std = mean.to(normalizer.mean.device), std.to(normalizer.mean.device)
    return lambda latents: normalizer.normalize(latents * std + mean)


@torch.no_grad()
def evaluate_checkpoint(checkpoint, data_dir=None, split: str = "val", max_windows: int | None = None,
                        device="cpu", batch_size: int = 8, musical: bool = True, target_audio: str | None = None,
                        progress: bool | None = None, listeners: bool = True, beat_tracker: str = "librosa",
                        references_dir=None, weights: str = "auto") -> dict:
    """Score a checkpoint and the three baselines on evenly spaced windows of a cache split.

    data_dir and target_audio default to the checkpoint's (target_audio: its --target_audio flag, 'auto'
    if it has none, resolved with its codec). progress None = a tqdm bar when stderr is a tty.
    Returns {"model", "baselines": {silence, repeat, oracle}, "skill", "windows", "checkpoint", "data_dir",
    "split", "target_audio", "weights", "epoch"}; every figure dict has the SCORE_NAMES keys.
    listeners: also the pretrained listeners' figures (listeners/; the Fréchet distance with the codec's encoder).
    Raises CheckpointError, CodecLoadError, CacheError, ValueError (EvaluationError) or ListenerUnavailable
    with one-line messages.
    """
    from tqdm import tqdm

    from music_continuation.codec import FrozenDecoder, check_fingerprint, codec_fingerprint, load_codec
    from music_continuation.data.cache import ContinuationDataset
    from music_continuation.training.checkpoint import load_model_for_inference

    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
    if listeners:
        from music_continuation.evaluation.listeners import check_available
        check_available(beat_tracker)     # a missing package fails now, not after loading everything
    model, normalizer, state = load_model_for_inference(checkpoint, device, weights)
    args = state.get("args") or {}
    data_dir = data_dir if data_dir is not None else args.get("data_dir")
    if not data_dir:
        raise EvaluationError(f"--checkpoint {checkpoint}: records no data_dir; pass --data_dir")
    segment_frames = state.get("segment_frames") or args.get("segment_frames")
    if not segment_frames:
        raise EvaluationError(f"--checkpoint {checkpoint}: records no segment_frames")
    encodec_weights = state.get("encodec_weights") or args.get("encodec_weights") or "pretrained"
    target_audio = resolve_target_audio(target_audio or args.get("target_audio") or "auto", encodec_weights)
    weights = loss_weights_of(args)

    codec = load_codec(encodec_weights, device)
    fingerprint = codec_fingerprint(codec)
    check_fingerprint(state["codec_fingerprint"], fingerprint, f"--checkpoint {checkpoint}")
    dataset = ContinuationDataset(data_dir, split, int(segment_frames), unity_test=bool(args.get("unity_test", False)))
    check_fingerprint(dataset.codec_fingerprint, fingerprint, f"--data_dir {data_dir}")
    from music_continuation.data.references import find_references
    # the training run's decoded segments, if a complete and current set exists (evaluate.py never writes one)
    references = find_references(data_dir, dataset.manifest, fingerprint, dataset.segment_frames,
                                 references_dir=references_dir or args.get("references_dir"))
    if references is not None:
        dataset.use_references(references)
    decoder = FrozenDecoder(codec)
    if listeners:
        from music_continuation.evaluation.listeners import Listeners
        listeners = Listeners(codec, beat_tracker, device)     # the codec's encoder: the Fréchet distance
    else:
        listeners = None
    del codec
    loss_fn = CombinedLoss(**weights).to(device)
    indices = select_windows(len(dataset), max_windows)

    model_sums = ScoreSums(device, "model")
    baseline_sums = {name: ScoreSums(device, name) for name in BASELINES}
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(indices), desc="evaluating", unit="window", file=sys.stderr, disable=not show, leave=False)
    for batch in _batches(dataset, indices, batch_size, device, _renormalizer(dataset, normalizer)):
        decoded = decode_windows(batch, decoder, normalizer)
        references = reference_audio(batch, decoder, normalizer, target_audio, decoded)
        score_model_batch(model, batch, decoder, normalizer, loss_fn, references, model_sums, musical, listeners)
        score_baselines_batch(batch, decoder, normalizer, loss_fn, target_audio, baseline_sums, musical, decoded,
                              listeners)
        bar.update(batch["input_latent"].shape[0])
    bar.close()

    model_means = model_sums.means()
    baselines = {name: sums.means() for name, sums in baseline_sums.items()}
    return {"model": model_means, "baselines": baselines,
            "skill": skill(model_means, baselines["repeat"], baselines["oracle"]),
            "windows": len(indices), "checkpoint": str(checkpoint), "data_dir": str(data_dir), "split": split,
            "target_audio": target_audio, "weights": weights, "epoch": state.get("epoch"),
            "weights_used": state["weights_used"]}


def format_table(result: dict) -> str:
    """Rows model, silence, repeat, oracle and skill; columns SCORE_NAMES ('n/a' for None)."""
    rows = [("model", result["model"])] + [(name, result["baselines"][name]) for name in BASELINES]
    rows.append(("skill", result["skill"]))
    widths = {name: max(12, len(name) + 2) for name in SCORE_NAMES}
    lines = [f"{'':<8}" + "".join(f"{name:>{widths[name]}}" for name in SCORE_NAMES)]
    for label, figures in rows:
        lines.append(f"{label:<8}" + "".join(
            f"{'n/a' if figures[name] is None else f'{figures[name]:.4f}':>{widths[name]}}" for name in SCORE_NAMES))
    return "\n".join(lines)
