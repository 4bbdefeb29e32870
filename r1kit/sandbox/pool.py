"""Score many candidates in parallel: a thread per slot, each driving one sandbox (a batch of candidates) at a time."""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from r1kit.sandbox.jail import DESCRIPTORS, Job, Outcome, check_sandbox, run_batch, run_candidate

BATCH = 32  # candidates a sandbox at most: a hung one delays the rest of its batch by its time limit (2 s more
# if its wipe overruns, after which the rest run one sandbox each)
FDS_PER_JOB = len(DESCRIPTORS) + 1  # a batch holds each candidate's until it ends, and a few of its own


def batch_size(jobs: int, workers: int) -> int:
    """Candidates a sandbox: the jobs spread over the workers, within BATCH and half this process's descriptors."""
    by_descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2 // (FDS_PER_JOB * workers)
    return max(1, min(BATCH, math.ceil(jobs / workers), by_descriptors))


def score_many(jobs: Sequence[Job], *, workers: int | None = None, timeout_s: float = 5.0, memory_mb: int = 512,
               max_processes: int = 8, max_output_bytes: int = 1 << 20,
               unsafe_no_sandbox: bool = False) -> list[Outcome]:
    """Score every job with the same limits, `workers` sandboxes at a time; results in job order.

    Each worker runs a batch of jobs through `run_batch` (one sandbox, a forked child a job). Threads suffice:
    each waits on a subprocess, and Popen without preexec_fn starts it by vfork, cheap even from a trainer
    holding gigabytes. A job that hangs or crashes costs its own time limit and scores 0.
    """
    if not unsafe_no_sandbox:
        check_sandbox()  # a refused sandbox is a configuration error: say so once, before any job
    workers = workers or min(32, 4 * (os.cpu_count() or 1))
    limits = {"timeout_s": timeout_s, "memory_mb": memory_mb, "max_processes": max_processes,
              "max_output_bytes": max_output_bytes}
    size = 1 if unsafe_no_sandbox else batch_size(len(jobs), workers)
    batches = [list(jobs[i:i + size]) for i in range(0, len(jobs), size)]

    def one(batch: list[Job]) -> list[Outcome]:
        if unsafe_no_sandbox:
            return [run_candidate(job.program, job.tests, stdin=job.stdin, unsafe_no_sandbox=True, **limits)
                    for job in batch]
        return run_batch(batch, **limits)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="r1kit-sandbox") as pool:
        return [outcome for outcomes in pool.map(one, batches) for outcome in outcomes]
