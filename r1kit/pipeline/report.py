"""One report over a pipeline's stages: a table of held-out metrics and time, and the curves of each stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from r1kit.pipeline.stages import read_record
from r1kit.rl.runlog import read_jsonl_rows

# what each kind of training stage plots along its steps
TRAINING_CURVES = {"train": ("reward", "rewards/accuracy", "rewards/format", "eval/greedy_accuracy",
                             "eval/sampled_accuracy"),
                   "sft": ("loss", "eval/loss", "eval/greedy_accuracy", "eval/sampled_accuracy")}
LENGTH = "completion_length_mean"  # tokens, on an axis of its own


def stage_rows(out: Path, names: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(name, record) of the base evaluation and each stage that has a record, in pipeline order."""
    rows = []
    for name in ["base", *names]:
        record = read_record(out / name)
        if record is not None:
            rows.append((name, record))
    return rows


def table(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Markdown table: each stage's held-out pass@1, format rate, language consistency, length, wall times."""
    lines = ["| stage | kind | status | pass@1 | format rate | language consistency | mean tokens | truncated | "
             "stage s | eval s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        e = r.get("eval")
        language = f"{e['language_consistency']:.3f}" if e and "language_consistency" in e else "-"
        metrics = (f"{e['pass@1']:.3f} | {e['format_rate']:.3f} | {language} | {e['response_tokens']['mean']:.0f} | "
                   f"{e['truncation_rate']:.3f}" if e else "- | - | - | - | -")
        stage_s = f"{r['wall_s']:.0f}" if "wall_s" in r else "-"
        eval_s = f"{e['wall_s']:.0f}" if e else "-"
        lines.append(f"| {name} | {r['kind']} | {r.get('status', '-')} | {metrics} | {stage_s} | {eval_s} |")
    return lines


def _plot_series(ax, metrics: list[dict[str, Any]], key: str, **style: Any) -> None:
    points = [(m["step"], m[key]) for m in metrics if isinstance(m.get(key), (int, float))]
    if points:
        ax.plot(*zip(*points, strict=True), label=key, marker="o" if len(points) < 30 else None, markersize=3,
                **style)
        if key == LENGTH:
            ax.set_ylabel("completion tokens", color="grey")


def by_time(metrics: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(training seconds, value) of a metric; a row without train_s (the evaluation after training) takes the
    time of the row before it, the one before training 0."""
    points, seconds = [], 0.0
    for m in metrics:
        seconds = m.get("train_s", seconds)
        if isinstance(m.get(key), (int, float)):
            points.append((seconds, m[key]))
    return points


def plot(out: Path, rows: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    """Held-out metrics by stage; held-out accuracy of every training stage against its training seconds
    (GRPO and SFT on one time axis); then each training stage's own curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = [(name, r["eval"]) for name, r in rows if r.get("eval")]
    trained = [(name, r) for name, r in rows if r["kind"] in TRAINING_CURVES]
    lines = 1 + (len(trained) + 1 + 3) // 4
    fig, axes = plt.subplots(lines, 4, figsize=(20, 3.6 * lines), squeeze=False)
    by_stage = [("held-out pass@1", lambda e: e["pass@1"], False),
                ("format rate", lambda e: e["format_rate"], True),
                ("language consistency", lambda e: e.get("language_consistency", float("nan")), True),
                ("mean response tokens", lambda e: e["response_tokens"]["mean"], False)]
    for ax, (title, value, rate) in zip(axes[0], by_stage, strict=True):
        ax.plot([n for n, _ in evaluated], [value(e) for _, e in evaluated], marker="o")
        if rate:  # on 0..1, so that 0.99997 against 1.0 does not look like a fall
            ax.set_ylim(-0.03, 1.03)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3)
    panels = list(axes[1:].flat)
    timed = panels[0]
    for name, _ in trained:
        points = by_time(read_jsonl_rows(out / name / "metrics.jsonl"), "eval/sampled_accuracy")
        if points:
            timed.plot(*zip(*points, strict=True), marker="o", markersize=3, label=name)
    timed.set_title("held-out sampled accuracy by training time")
    timed.set_xlabel("training seconds")
    timed.grid(alpha=0.3)
    if timed.lines:
        timed.legend(fontsize=7)
    for ax, (name, r) in zip(panels[1:], trained, strict=False):
        metrics = read_jsonl_rows(out / name / "metrics.jsonl")
        for key in TRAINING_CURVES[r["kind"]]:
            _plot_series(ax, metrics, key)
        if r["kind"] == "train":
            _plot_series(ax.twinx(), metrics, LENGTH, color="grey", alpha=0.5)
        ax.set_title(f"{name} ({r['kind']})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in panels[1 + len(trained) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_pipeline_report(out: Path, names: list[str]) -> Path:
    """report/index.md (the stage table) and report/curves.png of a pipeline's folder."""
    rows = stage_rows(out, names)
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    plot(out, rows, report / "curves.png")
    lines = [f"# Pipeline report: {out.name}", "", *table(rows), "", "![curves](curves.png)", ""]
    for name, r in rows:
        if r["kind"] in TRAINING_CURVES and (out / name / "report" / "curves.png").is_file():
            lines.append(f"- {name}: [all of its curves](../{name}/report/curves.png)")
    (report / "index.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report
