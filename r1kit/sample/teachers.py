"""Teachers: whatever writes traces for rejection sampling. Each has `generate(questions, params, keys)`
(params.n completions per question, group-major) and `identity()` (the provenance every kept row carries)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from r1kit.config import SampleConfig
from r1kit.prompts import BOXED, build_prompt
from r1kit.rollout import Completion, SamplingParams, make_generator
from r1kit.rollout.types import RoundByRound
from r1kit.sample.endpoint import EndpointTeacher
from r1kit.sft.data import trace_completion
from r1kit.tasks import DataError, Row

CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: 16-3-4=<<16-3-4=9>>9


TeacherRound = tuple[list[str], SamplingParams, list[int]]  # one generate() call's questions, settings and keys


class Teacher(Protocol):
    """Anything that writes traces for questions."""

    def generate(self, questions: list[str], params: SamplingParams, keys: list[int],
                 progress: Callable[[int], None] | None = None) -> list[Completion]:
        """params.n completions per question, group-major; keys are the questions' row indices in the task."""
        ...

    def generate_rounds(self, rounds: Iterable[TeacherRound], progress: Callable[[int], None] | None = None
                        ) -> Iterator[list[Completion]]:
        """generate() of each round in turn (a teacher may start the next before it yields this one)."""
        ...

    def identity(self) -> dict[str, str]: ...


class LocalTeacher:
    """A model r1kit loads, generating through the rollout engine (or HF generate on a CPU)."""

    def __init__(self, spec: str, template: str, batch_size: int, device: str, answer_format: str = BOXED):
        from r1kit.models import load_model, weights_sha256

        self.model, self.tokenizer = load_model(spec, device)
        self.spec, self.template, self.answer_format = spec, template, answer_format
        self.sha256 = weights_sha256(self.model.name_or_path)
        self.generator = make_generator(self.model, self.tokenizer, "auto", batch_size)

    def generate(self, questions: list[str], params: SamplingParams, keys: list[int],
                 progress: Callable[[int], None] | None = None) -> list[Completion]:
        """params.n traces per question; the caller's params.seed fixes them (keys are unused: one call, one seed)."""
        return self.generator.generate(self._prompts(questions), params, progress=progress)

    def generate_rounds(self, rounds: Iterable[TeacherRound], progress: Callable[[int], None] | None = None
                        ) -> Iterator[list[Completion]]:
        """generate() of each round in turn; through the engine (on a GPU) the next is queued while this one runs,
        its prompts taking the seats this round's last traces free."""
        return self.generator.generate_rounds(((self._prompts(q), params) for q, params, _ in rounds), progress)

    def _prompts(self, questions: list[str]) -> list[str]:
        return [build_prompt(q, self.tokenizer, self.template, self.answer_format) for q in questions]

    def identity(self) -> dict[str, str]:
        """The teacher's spec and weight sha256."""
        return {"teacher": self.spec, "teacher_sha256": self.sha256}


class SolutionsTeacher(RoundByRound):
    """No model: each row's own worked solution becomes the trace, `<think>{solution}</think>` then
    `\\boxed{answer}` (a cold start from a task's data, as GSM8K's training set allows)."""

    def __init__(self, rows: list[Row], field: str, data: str | None):
        missing = next((r for r in rows if not isinstance(r.get(field), str)), None)
        if missing is not None:
            raise DataError(f"{data}:{missing.get('_line', '?')}: teacher 'solutions' needs a {field!r} field "
                            "on every row (set solution_field)")
        self.rows, self.field, self.data = rows, field, data

    def generate(self, questions: list[str], params: SamplingParams, keys: list[int],
                 progress: Callable[[int], None] | None = None) -> list[Completion]:
        """One trace per question, from the row `keys` names (a solution is written once, however many samples
        are asked for)."""
        out = []
        for i, key in enumerate(keys):
            row = self.rows[key]
            solution = CALCULATOR.sub("", row[self.field])
            text = trace_completion(solution, f"\\boxed{{{row['answer']}}}")
            out.append(Completion(text=text, token_ids=[], finish_reason="stop", prompt_index=i))
            if progress:
                progress(1)
        return out

    def identity(self) -> dict[str, str]:
        """The data file and field the traces came from."""
        return {"teacher": "solutions", "teacher_data": str(self.data), "teacher_field": self.field}


def make_teacher(cfg: SampleConfig, rows: list[Row], answer_format: str = BOXED) -> Teacher:
    """The teacher a sample config names: an endpoint, the rows' solutions, or a local model (whose `chat` prompt
    asks for the answer answer_format, the task's)."""
    import os

    if cfg.teacher_url:
        return EndpointTeacher(cfg.teacher_url, cfg.teacher_model, os.environ.get(cfg.teacher_api_key_env),
                               cfg.concurrency, cfg.timeout_s, cfg.max_retries)
    if cfg.teacher == "solutions":
        return SolutionsTeacher(rows, cfg.solution_field, cfg.data)
    return LocalTeacher(cfg.teacher, cfg.template, cfg.batch_size, cfg.device, answer_format)
