"""Human-readable views of eval results: a rich table for the terminal, a Markdown summary file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table


def metric_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, formatted value) for each headline metric."""
    m = results["metrics"]
    rows = [(k, f"{v:.3f}") for k, v in m.items() if k.startswith(("pass@", "cons@"))]
    rows.append(("cons@k votes on", m.get("cons_grouping", "extracted answers")))
    lengths = m["response_tokens"]
    rows += [
        ("format rate", f"{m['format_rate']:.3f}"),
        ("language consistency", f"{m['language_consistency']:.3f}"),
        ("truncation rate", f"{m['truncation_rate']:.3f}"),
        ("response tokens mean / p50 / p90", f"{lengths['mean']:.0f} / {lengths['p50']:.0f} / {lengths['p90']:.0f}"),
        ("problems x samples", f"{m['problems']} x {m['samples_per_problem']}"),
        ("tokens/s", f"{m['tokens_per_s']:.0f}"),
        ("wall time", f"{results['wall_s']:.1f} s"),
    ]
    if "timings" in results:  # results.json written before it had them lack them
        t = results["timings"]
        rows.append(("wall time: load / generation / scoring",
                     f"{t['load_s']:.1f} / {t['generation_s']:.1f} / {t['scoring_s']:.1f} s"))
    return rows


def metrics_table(results: dict[str, Any]) -> Table:
    """A terminal table of the headline metrics."""
    title = f"{results['task']['name']} · {results['model']['spec']} ({results['model']['sha256'][:12]})"
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metric_rows(results):
        table.add_row(name, value)
    return table


def write_summary(results: dict[str, Any], records: list[dict[str, Any]], path: Path, examples: int = 3) -> None:
    """A Markdown page: metrics, settings, model identity and a few sample completions."""
    s = results["sampling"]
    lines = [
        f"# {results['task']['name']}: {results['model']['spec']}",
        "",
        f"model sha256 `{results['model']['sha256']}` · r1kit {results['r1kit_version']} · {results['created']}"
        + (" · **interrupted**" if results.get("interrupted") else ""),
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in metric_rows(results)),
        "",
        f"Sampling: n={s['n']}, temperature={s['temperature']}, top_p={s['top_p']}, top_k={s['top_k']}, "
        f"min_p={s['min_p']}, max_tokens={s['max_tokens']}, seed={s['seed']}, template={s['template']}.",
        "",
        "## Examples",
    ]
    for r in records[:examples]:
        lines += ["", f"**problem {r['problem']}** (gold `{r['gold']}`, extracted `{r['extracted']}`, "
                  f"accuracy {r['rewards']['accuracy']:.0f})", "", "```text", r["completion"].strip(), "```"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


PANELS: list[tuple[str, list[str]]] = [
    ("loss", ["loss", "eval/loss"]),
    ("reward", ["reward", "rollout_reward_mean"]),
    ("held-out accuracy", ["eval/greedy_accuracy", "eval/sampled_accuracy"]),
    ("rewards", []),  # filled with every rewards/* key
    ("KL to reference", ["kl"]),
    ("clip fraction", ["clip_fraction", "clip_low_fraction", "clip_high_fraction"]),
    ("entropy", ["entropy"]),
    ("completion length", ["completion_length_mean", "completion_length_max"]),
    ("truncation / reflection", ["truncation_rate", "reflection_rate"]),
    ("tokens/s (generated in GRPO, trained on in SFT)", ["tokens_per_s"]),
    ("learning rate", ["lr"]),
    ("seconds per step", ["generation_s", "scoring_s", "update_s", "step_s"]),
    ("groups with zero reward variance", ["zero_variance_groups"]),
    ("GPU memory (GB)", ["gpu_memory_gb"]),
]


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training(rows: list[dict[str, Any]], path: Path) -> None:
    """One PNG with a panel per family of metrics that the run logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reward_keys = sorted({k for r in rows for k in r if k.startswith("rewards/")})
    panels = [(title, keys or reward_keys) for title, keys in PANELS]
    panels = [(t, [k for k in keys if _series(rows, k)[0]]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    cols = 3
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(15, 3.2 * ((len(panels) + 2) // 3)),
                             squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            steps, values = _series(rows, key)
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_training_report(run_dir: str | Path) -> Path:
    """report/ of a training run: curves.png and index.md with completions from start, middle and end."""
    from r1kit.rl.runlog import read_jsonl_rows

    run_dir = Path(run_dir)
    rows = read_jsonl_rows(run_dir / "metrics.jsonl")
    if not rows:
        raise ValueError(f"{run_dir}: no metrics.jsonl (is it the `out` folder of r1kit train or sft?)")
    report = run_dir / "report"
    report.mkdir(exist_ok=True)
    plot_training(rows, report / "curves.png")
    samples = read_jsonl_rows(run_dir / "samples.jsonl")
    steps = sorted({s["step"] for s in samples})
    chosen = dict.fromkeys(steps[i] for i in (0, len(steps) // 2, -1)) if steps else {}
    evals = [r for r in rows if "eval/greedy_accuracy" in r]
    lines = [f"# Training report: {run_dir.name}", "", "![curves](curves.png)", ""]
    if evals:
        lines += ["| step | held-out greedy | held-out sampled |", "|---|---|---|"]
        lines += [f"| {r['step']} | {r['eval/greedy_accuracy']:.3f} | {r['eval/sampled_accuracy']:.3f} |"
                  for r in evals]
    for step in chosen:
        lines += ["", f"## Step {step}"]
        for s in [s for s in samples if s["step"] == step][:4]:
            lines += ["", f"**{s['prompt']}** (gold `{s['answer']}`, reward {s['reward']:.2f}, {s['finish_reason']})",
                      "", "```text", s["completion"].strip(), "```"]
    (report / "index.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report
