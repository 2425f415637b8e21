"""The listening page (OUT_DIR/index.html of inference_sample.py) and the metric columns it shares with the console.

The page is self-contained: inline CSS, relative links only (percent-encoded), nothing fetched from
elsewhere, so it works from disk and inside MLflow's artifact viewer. Per example: the players, the
spectrogram image and a table whose rows are the model and the baselines (evaluation.BASELINES:
silence, repeat, oracle) and whose columns are evaluation.SCORE_NAMES, so every figure is read
against doing nothing (silence), playing the context again (repeat) and the true next window's
latents decoded (oracle: the best any latent prediction can reach through this codec).

Every player is the same real lead-in and context followed, from the seam, by one ENDING:
    continuation   the model's continuation
    target         what the figures score against (--target_audio): the codec's decoding of the true
                   continuation ("codec"), or the original audio ("original")
    original       the original audio, a second reference (only when the target is the codec's decoding)

Which way is better comes from one table, BETTER: the training-loss components of losses.LOSSES and
their weighted sum `loss` and `latent_mse` are errors (lower is better), rhythm and chroma are
similarities (higher), level is the RMS ratio output / target (1 is right).
"""
from __future__ import annotations

import html
import math
import urllib.parse

from music_continuation.evaluation.scoring import BASELINES, SCORE_NAMES
from music_continuation.losses.audio import LOSSES

METRIC_NAMES = SCORE_NAMES
BETTER = {**{c.name: "lower" for c in LOSSES if not c.adversarial}, "loss": "lower", "latent_mse": "lower",
          "rhythm": "higher", "chroma": "higher", "level": "closest to 1", "melody_f1": "higher",
          "pitch_class_agreement": "higher", "beat_f1": "higher", "tempo_ratio": "closest to 1",
          "frechet_codec": "lower"}
ARROWS = {"lower": "&darr;", "higher": "&uarr;", "closest to 1": "&rarr;1"}
MODEL_ROW = "model"
ENDINGS = ("continuation", "target", "original")      # what follows the seam in each player (module docstring)
SEGMENTS = ("lead_in", "context") + ENDINGS           # the per-example WAVs the players are made of
TARGET_WHAT = {"codec": "the codec's decoding of the true continuation", "original": "the original audio"}


def player(ending: str) -> str:
    """The file role of the player that ends in `ending`: lead-in + context + ending."""
    return f"player_{ending}"


def ending_title(ending: str, target_audio: str) -> str:
    """The label of an ending, in the players and the spectrogram rows."""
    if ending == "continuation":
        return "model: its continuation"
    if ending == "target":
        return f"target, what the figures score against: {TARGET_WHAT[target_audio]}"
    return "original audio (a second reference, not scored)"


PAGE_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
section { border-top: 1px solid #ccc; padding: 1em 0; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.4em 0; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.model td { font-weight: bold; } tr.baseline td { color: #555; }
.player { margin: 0.4em 0; } .player span { margin-left: 0.6em; font-weight: bold; }
audio { vertical-align: middle; } img { max-width: 100%; } .note { color: #555; font-size: 0.9em; }
.warning { background: #fff3cd; border: 1px solid #e0c060; padding: 0.5em 0.8em; }
.failed { color: #a00; }
"""

METRICS_NOTE = (
    "Figures compare the first predicted segment with the target's first segment (rms_input: with the "
    "context, real or decoded as the target is): <code>loss</code> (the run's weighted sum) and the four "
    "training losses, <code>latent_mse</code> (normalised latents against the true next window's), "
    "<code>level</code> (RMS of the output / RMS of the target), <code>rhythm</code> (onset-envelope "
    "correlation) and <code>chroma</code> (concordance of pitch-class profiles: about 0 for noise or another "
    "key, 1 for the same), and the pretrained listeners' <code>melody_f1</code> (transcribed notes, onset "
    "±50 ms, pitch ±50 cents), <code>pitch_class_agreement</code>, <code>beat_f1</code> (beats after the seam, "
    "±70 ms), <code>tempo_ratio</code> and <code>frechet_codec</code> (a Fréchet distance between sets of "
    "EnCodec frames, not comparable to VGGish FAD; a figure of a set, so it is in the mean rows only; "
    "docs/musical-figures.md). "
    "&darr; lower is better, &uarr; higher is better, &rarr;1 closest to 1 is best; "
    "definitions in music_continuation/evaluation/listening_metrics.py, scoring.py and listeners/. "
    "Each figure is shown beside three baselines scored "
    "the same way: <b>silence</b> (zeros), <b>repeat</b> (the context's latents decoded as its own "
    "continuation) and <b>oracle</b> (the true next window's latents decoded: the best a latent prediction can "
    "do through this codec). A model worse than repeat on a figure has not learnt it.")

RANDOM_CODEC_NOTE = (
    "Random codec (<code>--encodec_weights random</code>): its decoder is not the encoder's inverse, so "
    "everything decoded (the model's continuation, the target, the baselines) sounds like noise whatever "
    "the model learnt; only the lead-in, the context and the original audio are music.")


def format_value(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def figure_rows(metrics: dict, baselines: dict | None) -> list[tuple[str, dict]]:
    """[(row label, figures)]: the model, then each baseline that was scored."""
    return [(MODEL_ROW, metrics)] + [(name, baselines[name]) for name in BASELINES if baselines and name in baselines]


def url(relative: str) -> str:
    """A relative file path as an attribute value: percent-encoded, then HTML-escaped."""
    return html.escape(urllib.parse.quote(relative), quote=True)


def metrics_html(rows: list[tuple[str, dict]]) -> str:
    """A table: one row per (label, figures), one column per METRIC_NAMES with its BETTER arrow."""
    header = "".join(f"<th title=\"{BETTER[name]} is better\">{name} {ARROWS[BETTER[name]]}</th>"
                     for name in METRIC_NAMES)
    body = "".join(f"<tr class=\"{'model' if label == MODEL_ROW else 'baseline'}\"><td>{html.escape(label)}</td>"
                   + "".join(f"<td>{format_value(figures.get(name))}</td>" for name in METRIC_NAMES) + "</tr>"
                   for label, figures in rows)
    return f"<table><tr><th></th>{header}</tr>{body}</table>"


def _intro(blind: bool, target_audio: str) -> str:
    what = TARGET_WHAT[target_audio]
    players = ("Every player plays the real audio before the context (the lead-in, so you know the music "
               "before the seam), the real context the model reads, then from the seam (dashed line in the "
               "spectrograms) its ending.")
    if blind:
        return (f"<p>Blind test. {players} One of A and B ends in the model's continuation, the other in the "
                f"target the figures score against ({what}). The original audio is not played here: with a "
                f"real codec it would tell the target apart. The key is in <code>blind_key.json</code> (do "
                f"not open it before listening).</p>")
    same = ("The lead-in and context are the same real audio in every player, so only what follows the seam "
            "differs, and the target player is what a perfect latent prediction would sound like in the model's "
            "place.")
    return (f"<p>{players} {same} Nothing is normalised: the table's <code>level</code> is the RMS of the "
            f"model's continuation over the target's, the two endings you hear (where the loudest player would "
            f"clip, all of the example's players play at one lower gain).</p>")


def _players(example, files: dict, target_audio: str) -> tuple[list[tuple[str, str]], str]:
    """([(label, relative wav)], relative image) of one example: A/B when blind, else named."""
    if example.blind is not None:
        return [(label, files[label]) for label in ("A", "B")], files["spectrogram_ab"]
    return ([(ending_title(ending, target_audio), files[player(ending)]) for ending in ENDINGS
             if player(ending) in files], files["spectrogram"])


def _example_section(example, files: dict, target_audio: str) -> str:
    players, image = _players(example, files, target_audio)
    parts = [f"<section><h2>{html.escape(example.name)}</h2><p class=\"note\">{html.escape(example.source)}</p>"]
    parts += [f"<div class=\"player\"><audio controls preload=\"none\" src=\"{url(relative)}\"></audio>"
              f"<span>{html.escape(label)}</span></div>" for label, relative in players]
    if example.player_gain < 1:
        parts.append(f"<p class=\"note\">Players at {20 * math.log10(example.player_gain):.1f} dB, all by the same "
                     f"gain, so that the loudest does not clip.</p>")
    parts.append(f"<p><img src=\"{url(image)}\" alt=\"log-mel spectrograms of {html.escape(example.name)}\"></p>")
    parts.append(metrics_html(figure_rows(example.metrics, example.baselines)))
    if example.blind is None:
        links = " &middot; ".join(f"<a href=\"{url(files[role])}\">{role}.wav</a>"
                                  for role in SEGMENTS if role in files)
        parts.append(f"<p class=\"note\">files: {links}</p>")
    parts.append("</section>")
    return "\n".join(parts)


def render_page(title: str, settings: dict, entries: list, means: dict, mean_baselines: dict | None,
                failures: list[dict], *, blind: bool, target_audio: str, random_codec: bool) -> str:
    """The page's HTML.

    entries: [(example, files)] where example has .name, .source, .blind ({"A": ending, "B": ending} or
    None), .player_gain, .metrics and .baselines ({baseline: figures} or None), and files maps roles and A/B to paths
    relative to the page (SEGMENTS, player(ending) for ENDINGS, "spectrogram", and with --blind "A", "B",
    "spectrogram_ab"). target_audio: "codec" or "original", what the figures score against.
    """
    head = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{PAGE_STYLE}</style></head><body>")
    listed = "; ".join(f"{html.escape(k)}: {html.escape(str(v))}" for k, v in settings.items())
    parts = [head, f"<h1>{html.escape(title)}</h1>", f"<p class=\"note\">{listed}</p>"]
    if random_codec:
        parts.append(f"<p class=\"warning\" id=\"random-codec\">{RANDOM_CODEC_NOTE}</p>")
    parts += [_intro(blind, target_audio), f"<p class=\"note\">{METRICS_NOTE}</p>"]
    if entries:
        parts.append("<h2>Mean over examples</h2>" + metrics_html(figure_rows(means, mean_baselines)))
    parts += [_example_section(example, files, target_audio) for example, files in entries]
    if failures:
        parts.append("<section><h2>Failed inputs</h2><ul>" + "".join(
            f"<li class=\"failed\">{html.escape(failure['error'])}</li>" for failure in failures) + "</ul></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


__all__ = ["BETTER", "ENDINGS", "METRIC_NAMES", "SEGMENTS", "TARGET_WHAT", "ending_title", "figure_rows",
           "format_value", "metrics_html", "player", "render_page", "url"]
