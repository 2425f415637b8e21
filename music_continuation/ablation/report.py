"""The ablation study's report: results.csv, results.md and results.png from the evaluated cells (pandas tables).

    rows: one per cell x seed, {"cell", "seed", "hash", "run_id", "result": evaluation.evaluate_checkpoint's
          figures, "unity": bool, "metrics": the cell's MLflow run metrics (last value of each)}

results.csv has one line per cell x seed with every figure, its skill, the baselines' figures and the training
gradient share of each loss component (train_grad_share_<component> of the run's last epoch; blank when the run
did not log it). results.md has per cell the mean ± std over seeds, the baselines, the skills and the shares.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from music_continuation.settings import (  # the share columns follow LOSS_COMPONENTS
    ADVERSARIAL_COMPONENTS,
    BASELINES,
    LOSS_COMPONENTS,
    LOSSES,
    adversarial_weighted,
)

# 'level' and 'tempo_ratio' are best at 1; everything else is an error or a distance (lower is better)
HIGHER_IS_BETTER = {"rhythm", "chroma", "melody_f1", "pitch_class_agreement", "beat_f1"}
CLOSEST_TO_ONE = {"level", "tempo_ratio"}
GRAD_SHARE_PREFIX = "train_grad_share_"  # the launcher's per-epoch metric: a component's share of the gradient



def figure_names() -> tuple:
    from music_continuation.evaluation import scoring as evaluation
    return tuple(evaluation.SCORE_NAMES)


def spread(values: list) -> tuple:
    """(mean, sample std) of the defined values; (None, None) if none, std None with one value."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def better(name: str, a: float, b: float, skill: bool = False) -> bool:
    """Is a better than b for this figure (or for its skill)?"""
    if skill or name in HIGHER_IS_BETTER:
        return a > b
    if name in CLOSEST_TO_ONE:
        return abs(a - 1.0) < abs(b - 1.0)
    return a < b


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.{digits}f}"


MARKDOWN_LEGEND = (
    "Mean ± standard deviation over seeds (sample std, n-1; none with one seed; per-seed values in results.csv). "
    "Best cell in each column in **bold**: lowest for the loss components, latent_mse and frechet_codec, closest "
    "to 1 for level and tempo_ratio, highest for rhythm, chroma, melody_f1, "
    "pitch_class_agreement, beat_f1 and skill. `loss` is each cell's own weighted total, so it is not "
    "comparable across cells (not marked): compare the components. Unity cells (`--unity_test`: target = "
    "input) are the pipeline's sanity check, not a contender: never marked. A baseline figure is one value when it "
    "is the same for every cell, else its range over the cells (`loss` follows each cell's weights; a unity "
    "cell's target is its input; the plot then marks each cell's own baseline over its bar).")


def write_report(rows: list[dict], cells_in_order: list[str], report_dir: Path, header: list[str],
                 listening: dict | None = None) -> str:
    """results.csv, results.md and results.png from the evaluated rows; returns the Markdown. `listening`: the
    statistics of the study's listening test (music_continuation.study.ratings.summarise, with "runs"), which
    add the listening columns, a section of results.md and a panel of the plot."""
    from music_continuation.utils import atomic_path
    names = figure_names()
    report_dir.mkdir(parents=True, exist_ok=True)
    table = results_table(rows, names, listening)
    with atomic_path(report_dir / "results.csv") as tmp:
        table.to_csv(tmp, index=False, na_rep="", float_format=None)
    by_cell = {name: [r for r in rows if r["cell"] == name] for name in cells_in_order}
    by_cell = {name: group for name, group in by_cell.items() if group}
    markdown = markdown_report(rows, by_cell, names, header, table, listening)
    with atomic_path(report_dir / "results.md") as tmp:
        tmp.write_text(markdown)
    plot(summarise(table, list(by_cell), names), baselines_per_cell(rows, list(by_cell), names), names,
         report_dir / "results.png", listening)
    return markdown


def share_components(rows: list[dict]) -> list[str]:
    """The components of the train_grad_share_* metrics the runs logged (LOSS_COMPONENTS order), or all of
    LOSS_COMPONENTS when none did (their columns are then blank)."""
    found = {key[len(GRAD_SHARE_PREFIX):] for r in rows for key in (r.get("metrics") or {})
             if key.startswith(GRAD_SHARE_PREFIX)}
    if not found:
        return list(LOSS_COMPONENTS)
    return [c for c in LOSS_COMPONENTS if c in found] + sorted(found - set(LOSS_COMPONENTS))


def results_table(rows: list[dict], names, listening: dict | None = None):
    """One row per cell x seed with every figure, its skill, the baselines' figures and the gradient shares
    (and with a listening test: its cell's rating, CI, n and Wilcoxon p, and this seed's own mean rating)."""
    import pandas as pd
    components = share_components(rows)
    records = []
    for row in rows:
        result, metrics = row["result"], row.get("metrics") or {}
        record = {"cell": row["cell"], "seed": row["seed"], "hash": row["hash"], "run_id": row["run_id"] or "",
                  "epoch": result.get("epoch"), "windows": result.get("windows"),
                  "target_audio": result.get("target_audio"),
                  "weights": " ".join(f"{k}={v:g}" for k, v in (result.get("weights") or {}).items())}
        record.update({n: number(result["model"].get(n)) for n in names})
        record.update({f"skill_{n}": number((result.get("skill") or {}).get(n)) for n in names})
        record.update({f"{b}_{n}": number(result["baselines"][b].get(n)) for b in BASELINES for n in names})
        record.update({f"grad_share_{c}": number(metrics.get(GRAD_SHARE_PREFIX + c)) for c in components})
        if listening is not None:
            record.update(listening_columns(listening, row["cell"], row["seed"]))
        records.append(record)
    return pd.DataFrame.from_records(records, columns=list(records[0]) if records else None)


def listening_columns(listening: dict, cell: str, seed) -> dict:
    """The listening test's columns of one cell x seed row (NaN where the cell or seed was not rated)."""
    stats = listening["cells"].get(cell) or {}
    own = listening["conditions"].get(f"{cell}/seed{seed}") or {}
    return {"listening_mean": number(stats.get("mean")), "listening_ci95": number(stats.get("ci95")),
            "listening_n": stats.get("n", 0), "listening_wilcoxon_p": number(stats.get("wilcoxon_p")),
            "listening_seed_mean": number(own.get("mean"))}


def number(value) -> float:
    return math.nan if value is None else float(value)


def summarise(table, cells: list[str], columns) -> dict:
    """{cell: {column: (mean, sample std)}} over the cell's seeds; None where undefined (std of one seed)."""
    grouped = table.groupby("cell", sort=False)[list(columns)].agg(["mean", "std"])

    def defined(value):
        return None if value is None or math.isnan(value) else float(value)
    return {c: {n: (defined(grouped.loc[c, (n, "mean")]), defined(grouped.loc[c, (n, "std")])) for n in columns}
            for c in cells}


def markdown_report(rows: list[dict], by_cell: dict, names, header: list[str], table=None,
                    listening: dict | None = None) -> str:
    """results.md: per cell the mean ± std over seeds of every figure, the baselines, the skill table and the
    gradient shares."""
    table = results_table(rows, names) if table is None else table
    cells = list(by_cell)
    summary = summarise(table, cells, names)
    skills = summarise(table, cells, [f"skill_{n}" for n in names])
    skills = {c: {n: skills[c][f"skill_{n}"] for n in names} for c in cells}
    skill_names = [n for n in names if any(skills[c][n][0] is not None for c in skills)]
    baselines = {b: {n: spread_same([r["result"]["baselines"][b].get(n) for r in rows]) for n in names}
                 for b in BASELINES}
    unity = {r["cell"] for r in rows if r.get("unity")}     # a sanity check (target = input): not a contender
    marks = best_of(summary, names, unity, skip=("loss",))
    extra = " listening (MUSHRA) |" if listening else ""
    weighted = weight_names(rows)
    label = "/".join(["in/tgt/spec/mel"] + [c.short for c in LOSSES if c.adversarial and c.name in weighted])
    lines = header + ["", MARKDOWN_LEGEND, "",
                      f"| cell | weights {label} | seeds | " + " | ".join(names) + " |" + extra,
                      "|---|---|---|" + "---|" * (len(names) + bool(listening))]
    for c, group in by_cell.items():
        lines.append(f"| {c} | {weights_of(group, weighted)} | {len(group)} | "
                     + " | ".join(cell_text(summary, marks, c, n) for n in names) + " |"
                     + (f" {listening_text(listening, c)} |" if listening else ""))
    for b in BASELINES:
        lines.append(f"| *{b}* | | | " + " | ".join(baselines[b][n] for n in names) + " |"
                     + (f" {listening_text(listening, b)} |" if listening else ""))
    if skill_names:
        skill_marks = best_of(skills, skill_names, unity, skip=("loss",), skill=True)
        lines += ["", "Skill per figure, (repeat - model) / (repeat - oracle): 1 = as good as the oracle, "
                  "0 = no better than repeating the context (mean ± std over seeds; best in **bold**).", "",
                  "| cell | " + " | ".join(f"skill {n}" for n in skill_names) + " |",
                  "|---|" + "---|" * len(skill_names)]
        for c in by_cell:
            lines.append(f"| {c} | " + " | ".join(cell_text(skills, skill_marks, c, n) for n in skill_names) + " |")
    lines += share_lines(table, cells, share_components(rows))
    if listening:
        lines += listening_lines(listening)
    return "\n".join(lines) + "\n"


def listening_text(listening: dict, cell: str) -> str:
    """A cell's (or the repeat baseline's) listening figure: mean ± 95% CI (n, p against the best cell)."""
    from music_continuation.study.report import cell_text as text
    value = text(listening, cell)
    return f"**{value}**" if cell == listening["best"] and value != "-" else value


def listening_lines(listening: dict) -> list[str]:
    """The listening test's section of results.md: who was kept and dropped, and every condition's rating."""
    from music_continuation.study.ratings import markdown_table, screening_line
    from music_continuation.study.report import LEGEND
    return ["", f"Listening test ({listening['test_dir']}, {listening['ratings']} ratings): "
            + screening_line(listening), "", LEGEND, "", *markdown_table(listening)]


def share_lines(table, cells: list[str], components: list[str]) -> list[str]:
    """The gradient-share table: each component's share of the training gradient in the run's last epoch
    (train_grad_share_<component>), mean ± std over seeds; '-' where the runs did not log it."""
    columns = [f"grad_share_{c}" for c in components]
    shares = summarise(table, cells, columns)
    lines = ["", "Gradient share per loss component in the last training epoch (train_grad_share_<component>; "
             "mean ± std over seeds; - : not logged).", "",
             "| cell | " + " | ".join(f"share {c}" for c in components) + " |", "|---|" + "---|" * len(components)]
    for c in cells:
        texts = []
        for column in columns:
            mean, std = shares[c][column]
            texts.append("-" if mean is None else fmt(mean) + ("" if std is None else f" ± {std:.2g}"))
        lines.append(f"| {c} | " + " | ".join(texts) + " |")
    return lines


def best_of(table: dict, columns, unity: set, skip=(), skill: bool = False) -> dict:
    """{column: the cell with the best mean} (unity cells never; a column needs two contenders)."""
    marks = {}
    for n in columns:
        if n in skip:
            continue
        candidates = [(c, table[c][n][0]) for c in table if table[c][n][0] is not None and c not in unity]
        if len(candidates) > 1:
            top = candidates[0]
            for candidate in candidates[1:]:
                if better(n, candidate[1], top[1], skill):
                    top = candidate
            marks[n] = top[0]
    return marks


def cell_text(table: dict, marks: dict, c: str, n: str) -> str:
    mean, std = table[c][n]
    text = fmt(mean) + ("" if std is None else f" ± {std:.2g}")
    return f"**{text}**" if marks.get(n) == c else text


def weight_names(rows: list) -> tuple[str, ...]:
    """The weights column's components: the four, and the adversarial two when some cell trains them."""
    adversarial = any(adversarial_weighted(row["result"].get("weights") or {}) for row in rows)
    return LOSS_COMPONENTS + (ADVERSARIAL_COMPONENTS if adversarial else ())


def weights_of(group: list, names: tuple[str, ...]) -> str:
    weights = group[0]["result"].get("weights") or {}
    return "/".join(f"{weights.get(k, 0):g}" for k in names)


def agree(values: list) -> bool:
    return bool(values) and None not in values and max(values) - min(values) <= 1e-9 * max(1.0, abs(max(values)))


def spread_same(values: list) -> str:
    """A baseline's figure as text: the value if every cell's evaluation agrees, else the range over cells."""
    defined = [v for v in values if v is not None]
    if not defined:
        return "n/a"
    if agree(values):
        return fmt(defined[0])
    return f"{fmt(min(defined))} – {fmt(max(defined))}"


def baselines_per_cell(rows: list[dict], cells: list[str], names) -> dict:
    """{baseline: {figure: {cell: mean over the cell's seeds, or None}}} for the plot."""
    result = {}
    for b in BASELINES:
        result[b] = {n: {c: spread([r["result"]["baselines"][b].get(n) for r in rows if r["cell"] == c])[0]
                         for c in cells} for n in names}
    return result


def plot(summary: dict, baselines: dict, names, path: Path, listening: dict | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from music_continuation.utils import atomic_path
    cells = list(summary)
    columns = 3
    rows = math.ceil((len(names) + bool(listening)) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    styles = {"silence": ("tab:gray", ":"), "repeat": ("tab:orange", "--"), "oracle": ("tab:green", "-.")}
    for axis, name in zip(axes.flat, names):
        means = [summary[c][name][0] for c in cells]
        errors = [summary[c][name][1] or 0.0 for c in cells]
        x = range(len(cells))
        axis.bar(x, [m if m is not None else 0.0 for m in means], yerr=errors, capsize=3, color="tab:blue",
                 alpha=0.8)
        for b, (colour, style) in styles.items():
            values = [baselines[b][name][c] for c in cells]
            if agree(values):          # the same for every cell: one line across the panel
                axis.axhline(values[0], color=colour, linestyle=style, linewidth=1.2, label=b)
            else:                      # each cell's own (its weights, or unity's windows): a line over its bar
                for position, value in enumerate(values):
                    if value is not None:
                        axis.hlines(value, position - 0.45, position + 0.45, color=colour, linestyle=style,
                                    linewidth=1.2, label=b)
        title = f"{name} (own weights: not comparable)" if name == "loss" else name
        axis.set_title(title, fontsize=9)
        axis.set_xticks(list(x))
        axis.set_xticklabels(cells, rotation=30, ha="right", fontsize=7)
        axis.tick_params(axis="y", labelsize=7)
    if listening:
        listening_panel(list(axes.flat)[len(names)], listening, cells)
    for axis in list(axes.flat)[len(names) + bool(listening):]:
        axis.axis("off")
    handles = {}
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        figure.legend(list(handles.values()), [f"baseline: {label}" for label in handles], loc="upper right",
                      fontsize=8, ncol=len(handles))
    figure.suptitle("bars: mean over seeds, whiskers: std over seeds"
                    + ("; listening: mean and 95% CI over raters x trials" if listening else ""),
                    fontsize=9, x=0.02, ha="left")
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)




def listening_panel(axis, listening: dict, cells: list[str]) -> None:
    """The listening test's bar per cell (mean, 95% CI whiskers) with its reference, repeat and anchor lines."""
    stats = [listening["cells"].get(c) or {} for c in cells]
    axis.bar(range(len(cells)), [s.get("mean") or 0.0 for s in stats], yerr=[s.get("ci95") or 0.0 for s in stats],
             capsize=3, color="tab:purple", alpha=0.8)
    styles = {"reference": ("tab:green", "-."), "repeat": ("tab:orange", "--"), "anchor": ("tab:gray", ":")}
    for kind, (colour, style) in styles.items():
        mean = (listening["cells"].get(kind) or {}).get("mean")
        if mean is not None:
            axis.axhline(mean, color=colour, linestyle=style, linewidth=1.2, label=f"rated {kind}")
    axis.set_ylim(0, 100)
    axis.set_title("listening (MUSHRA 0-100)", fontsize=9)
    axis.set_xticks(list(range(len(cells))))
    axis.set_xticklabels(cells, rotation=30, ha="right", fontsize=7)
    axis.tick_params(axis="y", labelsize=7)
