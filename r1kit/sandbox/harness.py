"""The code that runs first inside the sandbox: limits, privileges, then the candidate and its tests.

jail.py passes this file's text to `python -I -S -c`, so it uses the standard library only. Its verdict is one
line, `<nonce> <ran> <passed>`, written to an inherited file descriptor after the last test. The nonce comes
through a pipe read (and closed) before any candidate code runs, so exiting early, printing "PASSED",
redefining `check` or patching builtins and modules yields no valid verdict. The builtins and functions used
after the candidate starts are bound to locals first, so patching them cannot fake a pass either. A candidate
that digs the nonce out of this interpreter's memory (frames, ctypes) could forge its own score; it stays
inside the sandbox all the same.
"""

import os
import sys


def main() -> None:
    """`one FDS LIMITS UID`: run one candidate in this process; `batch ...`: run many, a forked child each."""
    mode, *args = sys.argv[1:]
    if mode == "batch":
        batch(args)
    nonce_fd, code_fd, result_fd, cpu_s, memory, processes, fsize, uid = (int(a) for a in args)
    candidate(nonce_fd, code_fd, result_fd, (cpu_s, memory, processes, fsize), uid)


def candidate(nonce_fd: int, code_fd: int, result_fd: int, limits: tuple[int, int, int, int], uid: int) -> None:
    """Set rlimits, drop to the sandbox uid, run the program then each test, write the verdict; never returns."""
    import resource
    import types

    cpu_s, memory, processes, fsize = limits
    with os.fdopen(nonce_fd, "rb") as f:
        nonce = f.read()
    with os.fdopen(code_fd, "rb") as f:
        program, *tests = f.read().decode().split("\0")
    limits = ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory), (resource.RLIMIT_NPROC, processes),
              (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 256))
    for limit, value in limits:
        resource.setrlimit(limit, (value, value))  # soft == hard: the candidate cannot raise them back
    if uid:  # started as root (caps SETUID/SETGID only): become a uid of its own, which loses those caps too
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)

    # bound before the candidate runs: it may replace builtins, os or sys attributes, not these references
    run, build, write, quit_, stdout, stderr = exec, compile, os.write, os._exit, sys.stdout, sys.stderr
    base_error, exit_error, numbered = BaseException, SystemExit, enumerate
    import builtins

    builtins.exit = builtins.quit = sys.exit  # what `site` would add; -S leaves them out, scripts use them
    module = types.ModuleType("__main__")
    sys.modules["__main__"] = module
    sys.argv = ["main.py"]

    def report(error: BaseException) -> None:
        try:  # imported only on failure: it costs more than the rest of the harness's startup
            import traceback

            traceback.print_exception(error)
        except base_error:
            try:  # noqa: SIM105 (contextlib is the candidate's to patch by now)
                write(2, b"%s\n" % repr(error).encode(errors="replace"))
            except base_error:
                pass

    def attempt(source: str, name: str, exit_ok: bool) -> bool:
        try:
            run(build(source, name, "exec"), module.__dict__)
            return True
        except exit_error as e:  # a script may end with exit(0); a function under test may not
            if exit_ok and e.code in (None, 0):
                return True
            report(e)
            return False
        except base_error as e:
            report(e)
            return False

    ran = attempt(program, "main.py", True)
    passed = 0
    if ran:
        for i, test in numbered(tests):
            if attempt(test, f"test_{i}.py", False):
                passed += 1
    for stream in (stdout, stderr):
        try:  # noqa: SIM105
            stream.flush()
        except base_error:
            pass
    write(result_fd, b"%s %d %d\n" % (nonce, ran, passed))
    quit_(0)  # no atexit hooks, no waiting on the candidate's threads


def batch(args: list[str]) -> None:
    """Run many candidates in this one sandbox, one at a time, each in a forked child under a uid of its own.

    Forking this warm interpreter replaces a sandbox and an interpreter start a candidate. Started as root with
    CAP_SETUID/SETGID only, this process cannot be signalled, traced or read by the children (other uids), and it
    never reads a nonce or a program. After each child it kills every process of that uid and deletes the uid's
    files in /tmp and /dev/shm, so the next candidate finds them empty and alone; if the wipe overruns or leaves
    anything, it stops and the host runs the rest one sandbox each. Reports `<index> <timed out> <wait status>
    <ms>` a line on the progress fd; never returns.
    """
    import builtins  # noqa: F401 (imported once here, found by every child)
    import resource  # noqa: F401
    import time
    import traceback  # noqa: F401 (a failing candidate's report needs it)
    import types  # noqa: F401

    progress, timeout_ms, *limits = (int(a) for a in args[:6])
    jobs = [[int(x) for x in spec.split(",")] for spec in args[6:]]  # nonce, code, result, stdin, out, err, uid
    held = {fd for job in jobs for fd in job[:6]}
    for index, (nonce, code, result, stdin, out, err, uid) in enumerate(jobs):
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                for fd, target in ((stdin, 0), (out, 1), (err, 2)):
                    os.dup2(fd, target)
                for fd in held - {nonce, code, result}:
                    os.close(fd)
                os.close(progress)
                candidate(nonce, code, result, tuple(limits), uid)
            finally:
                os._exit(1)
        timed_out = not wait_for(pid, timeout_ms)
        wiped = wipe_uid(uid)
        reaped = wait_for(pid, 1000)  # killed by the wipe if it was still running
        status = os.waitpid(pid, 0)[1] if reaped else 9  # as if killed: SIGKILL's wait status
        for fd in (nonce, code, result, stdin, out, err):
            os.close(fd)
            held.discard(fd)
        elapsed = int(1000 * (time.monotonic() - start))
        os.write(progress, b"%d %d %d %d\n" % (index, timed_out or not reaped, status, elapsed))
        if not (wiped and reaped) or os.listdir("/tmp") or os.listdir("/dev/shm") or strays():
            break
    os._exit(0)


def wait_for(pid: int, timeout_ms: int) -> bool:
    """Whether the process exited within timeout_ms (poll on a pidfd: the fds here may be numbered above 1024)."""
    import select

    exited = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(exited, select.POLLIN)
        return bool(poller.poll(timeout_ms))
    finally:
        os.close(exited)


def wipe_uid(uid: int) -> bool:
    """Kill every process of `uid` and delete its files, from a child acting as `uid` (there is no CAP_KILL here);
    whether that ended within two seconds."""
    import signal

    outsider = (1 << 30) - 1  # real and saved ids no candidate has, so no candidate may signal the wipe
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(outsider, uid, outsider)
            os.setresuid(outsider, uid, outsider)
            os.kill(-1, signal.SIGKILL)  # every process whose real uid is `uid`, atomically
            for top in ("/tmp", "/dev/shm"):
                for name in os.listdir(top):
                    wipe(os.path.join(top, name))
        finally:
            os._exit(0)
    if not wait_for(pid, 2000):  # a tree built to be slow to delete: stop here, the sandbox's end takes it all
        return False
    os.waitpid(pid, 0)
    return True


def wipe(path: str) -> None:
    """Delete a file or a tree its owner may have made unreadable; what remains is left for the caller to see."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
            for name in os.listdir(path):
                wipe(os.path.join(path, name))
            os.rmdir(path)
        else:
            os.unlink(path)
    except Exception:  # noqa: BLE001 (too deep, or gone: the emptiness check decides)
        pass


def strays() -> bool:
    """Whether a process other than this sandbox's root ones is alive (zombies waiting for init aside)."""
    import time

    for _ in range(3):  # a process killed a moment ago may not have exited yet
        alive = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            alive |= fields.get("State", "Z").split()[0] not in ("Z", "X") and fields["Uid"].split()[0] != "0"
        if not alive:
            return False
        time.sleep(0.005)
    return True


if __name__ == "__main__":
    main()
