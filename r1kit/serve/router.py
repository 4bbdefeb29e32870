"""The router (`auto`: hard questions to the reasoner, plumbing to the fast model) and the gate
(`gate`: several samples, an answer only on consensus)."""

from __future__ import annotations

from collections.abc import Callable
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
        self.verify = _import(cfg.verifier, "verifier") if cfg.verifier else None

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
