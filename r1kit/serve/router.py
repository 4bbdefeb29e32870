"""The router (`auto`: hard questions to the reasoner, plumbing to the fast model) and the gate
(`gate`: several samples, an answer only on consensus)."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from r1kit.config import GateConfig, RouteConfig
from r1kit.eval.metrics import majority_clusters
from r1kit.grading import extract_answer, is_equiv


def _import(spec: str, what: str) -> Callable:
    from r1kit.tasks.datasets import import_function

    return import_function(spec, what)


class Router:
    """Picks the reasoner or the fast model for a conversation's last user message."""

    def __init__(self, cfg: RouteConfig):
        self.cfg = cfg
        self.classify = _import(cfg.classifier, "classifier") if cfg.rule == "classifier" else None
        if cfg.rule == "classifier" and not cfg.classifier:
            raise ValueError("route rule 'classifier' needs route.classifier: module:function")

    def pick(self, text: str) -> str:
        """The name of the model that should answer text."""
        if self.cfg.rule == "length":
            hard = len(text) >= self.cfg.min_chars
        elif self.cfg.rule == "classifier":
            hard = bool(self.classify(text))
        else:
            lowered = text.lower()
            hard = any(k.lower() in lowered for k in self.cfg.keywords)
        return self.cfg.reasoner if hard else self.cfg.fast

    def other(self, name: str) -> str:
        """The route's other model: it answers when `name` (the upstream) cannot."""
        return self.cfg.fast if name == self.cfg.reasoner else self.cfg.reasoner


def check_names(served: set[str], router: Router | None, gate: Gate | None, upstream: str | None) -> None:
    """Every model a route or the gate names is served; a route may name the upstream for one of its two."""
    routed = [router.cfg.reasoner, router.cfg.fast] if router else []
    if upstream in served:
        raise ValueError(f"upstream.name {upstream!r} is also a served model's name")
    if upstream is not None and routed.count(upstream) == 2:
        raise ValueError("route names the upstream as both reasoner and fast: one must be local, to answer when "
                         "the upstream is down")
    for name in [n for n in routed if n != upstream] + ([gate.cfg.model] if gate else []):
        if name not in served:
            raise ValueError(f"route/gate names model {name!r}, which is not served ({', '.join(sorted(served))})")


@dataclass
class Verdict:
    """What the gate decided over its samples."""

    confident: bool
    agreement: float
    answer: str | None
    chosen: int | None


class Gate:
    """Answers only when enough samples agree (majority over equal final answers) or pass a verifier."""

    def __init__(self, cfg: GateConfig):
        self.cfg = cfg
        self.verify = _import(cfg.verifier, "verifier") if cfg.verifier else None  # here too: a bad spec fails now
        self._judge: ProcessPoolExecutor | None = None

    async def judge(self, contents: list[str]) -> Verdict:
        """decide(contents) in a process of the gate's own, awaited without blocking the event loop.

        Its comparisons (sympy, quadratic in the samples) or the user's verifier take seconds, and on the loop
        they stalled every other stream. Not a thread: it would share the loop's interpreter lock and lose
        math-verify's timeouts (SIGALRM, main thread only), so a verdict could differ from decide()'s here."""
        if self._judge is None:  # spawned, not forked: the server has threads, and on a GPU CUDA
            self._judge = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                              initializer=_start_judge, initargs=(self.cfg,))
        try:
            return await asyncio.get_running_loop().run_in_executor(self._judge, _judged, contents)
        except BrokenProcessPool:  # the process died (the OOM killer, a verifier that exits): a new one next time
            self.close()
            raise

    def close(self) -> None:
        """Stop the judging process, if one was started."""
        if self._judge is not None:
            self._judge.shutdown(wait=False, cancel_futures=True)
            self._judge = None

    def decide(self, contents: list[str]) -> Verdict:
        """The verdict over the answers (message contents) of one question's samples."""
        if self.verify is not None:
            passed = [i for i, text in enumerate(contents) if self.verify(text)]
            agreement = len(passed) / len(contents)
            chosen = passed[0] if passed else None
            return Verdict(agreement >= self.cfg.min_agreement, agreement, None, chosen)
        answers = [extract_answer(text) or (text.strip() or None) for text in contents]
        clusters = majority_clusters(answers, is_equiv)
        if not clusters:
            return Verdict(False, 0.0, None, None)
        top = max(clusters, key=len)
        agreement = len(top) / len(contents)
        return Verdict(agreement >= self.cfg.min_agreement, agreement, answers[top[0]], top[0])

    def refusal(self, verdict: Verdict) -> str:
        """What the gate says when its samples do not agree."""
        return (f"I am not confident enough to answer: only {verdict.agreement:.0%} of my {self.cfg.samples} "
                f"attempts agree (at least {self.cfg.min_agreement:.0%} needed).")


_gate: Gate | None = None  # the judging process's own gate


def _start_judge(cfg: GateConfig) -> None:
    global _gate
    _gate = Gate(cfg)


def _judged(contents: list[str]) -> Verdict:
    return _gate.decide(contents)
