"""Data flows one way between modules: tasks, then rewards, then the trainer."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module, downstream", [
    ("r1kit.grading", "r1kit.tasks"),
    ("r1kit.tasks", "r1kit.rewards"),
    ("r1kit.rewards", "r1kit.rl"),
])
def test_importing_a_module_does_not_import_what_comes_after_it(module, downstream):
    code = (f"import sys, {module}; "
            f"late = sorted(m for m in sys.modules if m == {downstream!r} or m.startswith({downstream!r} + '.')); "
            "print(' '.join(late)); sys.exit(1 if late else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"importing {module} imports {result.stdout.strip() or result.stderr[-2000:]}"


def test_moved_names_keep_working_where_they_are_imported():
    from r1kit.rewards import completion_text
    from r1kit.tasks.base import completion_text as home

    assert completion_text is home
    assert completion_text([{"role": "assistant", "content": "4"}]) == "4"
