"""Human-readable views of eval results: a rich table for the terminal, a Markdown summary file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table


def metric_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, formatted value) for each headline metric."""
    m = results["metrics"]
    rows = [(k, f"{v:.3f}") for k, v in m.items() if k.startswith(("pass@", "cons@"))]
    lengths = m["response_tokens"]
    rows += [
        ("format rate", f"{m['format_rate']:.3f}"),
        ("truncation rate", f"{m['truncation_rate']:.3f}"),
        ("response tokens mean / p50 / p90", f"{lengths['mean']:.0f} / {lengths['p50']:.0f} / {lengths['p90']:.0f}"),
        ("problems x samples", f"{m['problems']} x {m['samples_per_problem']}"),
        ("tokens/s", f"{m['tokens_per_s']:.0f}"),
        ("wall time", f"{results['wall_s']:.1f} s"),
    ]
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
