"""`r1kit eval` with the engine's rounds run into each other (now: the next round queued while this one runs)
or round by round (before: each round drains to its longest sample), for a GPU measurement of the difference.
Run each in its own process (a second run in one process would find everything compiled):
  python bench/eval_rounds.py [--round-by-round] -- --model default --task gsm8k --data gsm8k_test.jsonl \
      --samples 4 --temperature 0.6 --top-p 0.95 --max-new-tokens 1024 --out /tmp/eval
Everything after `--` is `r1kit eval`'s arguments; results.json's `wall_s`, `metrics.generation_s` and
`engine_steps` hold the figures.
"""

from __future__ import annotations

import sys

from r1kit.cli import main as r1kit_main
from r1kit.rollout.engine import EngineGenerator


def main() -> int:
    args = sys.argv[1:]
    if "--" not in args or args[0] not in ("--", "--round-by-round"):
        print(__doc__)
        return 2
    if args[0] == "--round-by-round":  # the engine as it was before: a round drains before the next is queued
        one_round = EngineGenerator.generate_rounds
        EngineGenerator.generate_rounds = lambda self, rounds, progress=None: (
            completions for r in rounds for completions in one_round(self, [r], progress))
    return r1kit_main(["eval", *args[args.index("--") + 1 :]])


if __name__ == "__main__":
    sys.exit(main())
