"""Score many candidates in parallel: a thread per slot, each driving one sandboxed subprocess at a time."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from r1kit.sandbox.jail import Outcome, check_sandbox, run_candidate


@dataclass(frozen=True)
class Job:
    """One candidate: the program, its test chunks and its stdin."""

    program: str
    tests: str | Sequence[str] = ()
    stdin: str = ""


def score_many(jobs: Sequence[Job], *, workers: int | None = None, timeout_s: float = 5.0, memory_mb: int = 512,
               max_processes: int = 8, max_output_bytes: int = 1 << 20,
               unsafe_no_sandbox: bool = False) -> list[Outcome]:
    """Run every job through `run_candidate` with the same limits, `workers` at a time; results in job order.

    Threads suffice: each waits on a subprocess, and Popen without preexec_fn starts it by vfork, cheap even from
    a trainer holding gigabytes. A job that hangs or crashes costs its own time limit and scores 0.
    """
    if not unsafe_no_sandbox:
        check_sandbox()  # a refused sandbox is a configuration error: say so once, before any job
    # a sandbox spends most of its ~20 ms waiting on the kernel (namespace set-up and teardown), so more
    # workers than cores pay off: 8 on 2 cores scored HumanEval about twice as fast as 2 (bench/sandbox_speed.py)
    workers = workers or min(32, 4 * (os.cpu_count() or 1))

    def one(job: Job) -> Outcome:
        return run_candidate(job.program, job.tests, stdin=job.stdin, timeout_s=timeout_s, memory_mb=memory_mb,
                             max_processes=max_processes, max_output_bytes=max_output_bytes,
                             unsafe_no_sandbox=unsafe_no_sandbox)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="r1kit-sandbox") as pool:
        return list(pool.map(one, jobs))
