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
    """Set rlimits, drop to the sandbox uid, run the program then each test, write the verdict."""
    nonce_fd, code_fd, result_fd, cpu_s, memory, processes, fsize, uid = (int(a) for a in sys.argv[1:9])
    import resource
    import types

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


if __name__ == "__main__":
    main()
