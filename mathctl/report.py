"""`mathctl report RUN_DIR...`: plots and a report.md for finished (or running) run folders.

What a folder gets depends on what its run logged:
    metrics.jsonl with `step`   loss (and eval loss), learning rate, grad norm, reward (total and per
                                function), KL, completion length, accuracy: one PNG each, against the step
    summary.json of an eval     accuracy per task (bar chart, with pass@k / maj@k / bon@k at the largest k)
    rounds.jsonl (mcts-sample)  solve rate and accuracy per round
    pipeline.json               every stage folder is reported too, and report.md links them
report.md shows the plots, the summary's figures and the resolved recipe.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mathctl.core.errors import ConfigError
from mathctl.core.io import atomic_write_text
from mathctl.core.rundir import RunDir

# (file name, title, y label, [(metric key or prefix*, legend label)])
CURVES = [
    ("loss", "Training loss", "loss", [("loss", "train loss"), ("eval_loss", "eval loss")]),
    ("lr", "Learning rate", "learning rate", [("lr", "lr")]),
    ("grad_norm", "Gradient norm (before clipping)", "grad norm", [("grad_norm", "grad norm")]),
    ("reward", "Reward per step", "mean reward", [("reward", "total"), ("reward_mean10", "total, mean of 10 steps"),
                                                  ("reward/*", "")]),
    ("kl", "KL to the reference", "KL (k3)", [("kl", "KL")]),
    ("completion_len", "Completion length", "tokens", [("completion_len", "mean completion length")]),
    ("accuracy", "Accuracy", "accuracy", [("accuracy", "train"), ("eval_accuracy", "held out"),
                                          ("eval_likelihood_accuracy", "held out, likelihood (dpo)")]),
    ("margin", "Reward margin (chosen - rejected)", "margin", [("rewards/margin", "train"), ("eval_margin", "held out")]),
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict[str, Any]], spec: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for key, label in spec:
        if key.endswith("*"):
            prefix = key[:-1]
            names = sorted({k for r in records for k in r if k.startswith(prefix)})
            out += [(name, name[len(prefix):]) for name in names]
        else:
            out.append((key, label))
    return out


def curve_plots(run: RunDir) -> list[Path]:
    from mathctl.training import plot_curves

    records = [dict(r) for r in run.read_metrics() if "step" in r]
    rewards = [(i, r["reward"]) for i, r in enumerate(records) if isinstance(r.get("reward"), (int, float))]
    for j, (i, _) in enumerate(rewards):  # a moving mean: per-step rewards of a small batch are noisy
        window = [v for _, v in rewards[max(0, j - 9): j + 1]]
        records[i]["reward_mean10"] = sum(window) / len(window)
    functions = {k for r in records for k in r if k.startswith("reward/")}
    if len(functions) == 1:  # one reward function: its curve is the total's
        for r in records:
            r.pop(next(iter(functions)), None)
    paths = []
    for name, title, ylabel, spec in CURVES:
        series = _series(records, spec)
        path = plot_curves(records, series, run.plots_dir / f"{name}.png", title, ylabel=ylabel)
        if path is not None:
            paths.append(path)
    return paths


def eval_plot(run: RunDir, summary: dict[str, Any]) -> Path | None:
    tasks = summary.get("tasks") or {}
    if not tasks:
        return None
    plt = _plt()
    names = [Path(t).stem if t.endswith(".jsonl") else t for t in tasks]
    n = max(entry.get("n", 1) for entry in tasks.values())
    bars: dict[str, list[float]] = {"accuracy" if n == 1 else f"mean of {n} samples":
                                    [entry.get("score", 0.0) for entry in tasks.values()]}
    for metric in ("pass@k", "maj@k", "bon@k"):
        values = [entry.get(metric) or {} for entry in tasks.values()]
        if all(values) and any(entry.get("n", 1) > 1 for entry in tasks.values()):
            k = max(values[0], key=int)
            bars[metric.replace("k", k)] = [v[max(v, key=int)] for v in values]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) * len(bars)), 4), dpi=120)
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars.items()):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, values, width=width, label=label)
        for x, v in zip(xs, values):
            ax.text(x, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks([j + width * (len(bars) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("share of problems")
    ax.set_title("Eval accuracy per task")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = run.plots_dir / "eval_accuracy.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def rounds_plot(run: RunDir) -> Path | None:
    from mathctl.plots import plot_rounds

    path = run.path / "rounds.jsonl"
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif (run.path / "trees.jsonl").is_file() and run.summary_path.is_file():
        rows = [{"round": 1, **json.loads(run.summary_path.read_text())}]
    else:
        return None
    return plot_rounds(rows, run.plots_dir / "solve_rate.png") if rows else None


def _figures(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """Scalar figures of a summary, flattened one level (tasks and rounds get their own lines)."""
    out = []
    for key, value in summary.items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            out.append((key, str(value)))
        elif key == "tasks" and isinstance(value, dict):
            for task, entry in value.items():
                out.append((f"{task}: score", f"{entry.get('score', 0):.4f}"))
                for metric in ("pass@k", "maj@k", "bon@k"):
                    for k, v in (entry.get(metric) or {}).items():
                        out.append((f"{task}: {metric.replace('k', k)}", f"{v:.4f}"))
        elif key == "rounds" and isinstance(value, list):
            for row in value:
                out.append((f"round {row['round']}", f"solve rate {row['solve_rate']:.4f}, accuracy {row['accuracy']:.4f}"))
        elif key == "stages" and isinstance(value, list):
            for row in value:
                out.append((f"stage {row['stage']} ({row['step']})", row.get("result", "")))
    return out


def write_report(folder: str | Path) -> list[Path]:
    """Plots and report.md for one run folder (and for each stage of a pipeline folder)."""
    run = RunDir(folder)
    if not run.path.is_dir():
        raise ConfigError(f"run folder {run.path} does not exist", hint="give the folder of a mathctl run")
    if not (run.recipe_path.is_file() or run.summary_path.is_file() or run.metrics_path.is_file()):
        raise ConfigError(f"{run.path} is not a mathctl run folder (no recipe.yaml, summary.json or metrics.jsonl)",
                          hint="give the folder a mathctl command wrote (its --run-dir)")
    written: list[Path] = []
    stage_links = []
    pipeline = run.path / "pipeline.json"
    if pipeline.is_file():
        for row in json.loads(pipeline.read_text()).get("stages", []):
            stage = Path(row["folder"])
            if stage.is_dir() and (stage / "summary.json").is_file() and (stage / "recipe.yaml").is_file():
                written += write_report(stage)
            stage_links.append((row, stage))
    summary = json.loads(run.summary_path.read_text()) if run.summary_path.is_file() else {}
    plots = curve_plots(run)
    for extra in (eval_plot(run, summary), rounds_plot(run)):
        if extra is not None:
            plots.append(extra)
    meta = run.read_meta()
    lines = [f"# Report: {run.path.name}", "",
             f"- step: `{meta.get('step', summary.get('step', '?'))}`, status: `{meta.get('status', summary.get('status'))}`",
             f"- started {meta.get('started')}, ended {meta.get('ended')}",
             f"- mathctl {meta.get('versions', {}).get('mathctl')}, git {meta.get('git_revision')}, seeds {meta.get('seeds')}",
             ""]
    if stage_links:
        lines += ["## Stages", "", "| stage | step | result | folder |", "|---|---|---|---|"]
        for row, stage in stage_links:
            link = f"[{stage.name}]({stage.name}/report.md)" if (stage / "report.md").is_file() else stage.name
            lines.append(f"| {row['stage']} | {row['step']} | {row.get('result', '')} | {link} |")
        lines.append("")
    figures = _figures(summary)
    if figures:
        lines += ["## Summary", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in figures]
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
        lines.append("")
    if run.recipe_path.is_file():
        lines += ["## Recipe (resolved)", "", "```yaml", run.recipe_path.read_text().rstrip(), "```", ""]
    out = run.path / "report.md"
    atomic_write_text(out, "\n".join(lines))
    return written + plots + [out]
