"""Where a batch-1 generate's decode steps go, by context: each step's wall time and the part of it the host
spent waiting for the step's tokens (the device's share), averaged over ranges of steps.

The engine is set up as engine_shapes.py's `--shape default` runs it: one --batch x --new run first (its
compiling and capturing), then `per_token_ms`, then --reps generates of one prompt, each step timed. On a GPU,
then the batch-1 step's graph replayed back to back and with generate's hand-off, alternating.
  python bench/step_times.py --out $OUT/step_times.json
  python bench/step_times.py --engine '{"graph_prefill_tokens": 0}'     # an engine option changed
  python bench/step_times.py --device cpu --batch 4 --new 8              # the CPU check
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from functools import partial

import torch
from bench_io import emit
from rollout import decoding, ms_per_call, per_token_ms, prompts, timed

from r1kit.models import load_model, load_tokenizer
from r1kit.rollout import SamplingParams
from r1kit.rollout.engine import EngineGenerator


def timed_steps(engine: EngineGenerator, text: str, params: SamplingParams) -> list[tuple[str, float, float]]:
    """(kind, seconds, seconds waiting for the device) of each step of one generate."""
    llm, waited, steps = engine.engine, [0.0], []
    wait, step = torch.cuda.Event.synchronize, llm.step

    def timed_wait(event) -> None:
        started = time.perf_counter()
        wait(event)
        waited[0] += time.perf_counter() - started

    def timed_step():
        waited[0], started = 0.0, time.perf_counter()
        advanced = step()
        steps.append((llm.last_step, time.perf_counter() - started, waited[0]))
        return advanced

    torch.cuda.Event.synchronize, llm.step = timed_wait, timed_step
    try:
        engine.generate([text], params)
    finally:
        torch.cuda.Event.synchronize, llm.step = wait, step
    return steps


def replays(engine: EngineGenerator, text: str, rounds: int = 4, repeats: int = 50) -> dict[str, float]:
    """Milliseconds of a batch-1 decode step replayed back to back, and with generate's hand-off (the step's
    tokens copied to pinned host memory behind an event, the host waiting on the step before it), in alternating
    rounds at the same contexts. Session 17 found 525b938's steps faster inside generate than back to back."""
    llm = decoding(engine, [text], 2 * rounds * repeats + 8, steps=3)
    state, device = llm.decode_step, llm.device
    host = torch.empty((1, 2), dtype=torch.float64, pin_memory=True)
    previous: list[torch.cuda.Event] = []

    def handed_off() -> None:
        host.copy_(state.step(1, False), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        if previous:
            previous.pop().synchronize()
        previous.append(event)

    ways = {"back_to_back_ms": lambda: state.step(1, False), "with_handoff_ms": handed_off}
    spent = dict.fromkeys(ways, 0.0)
    for r in range(rounds):
        for name in list(ways)[:: 1 if r % 2 == 0 else -1]:  # each way first in every other round
            spent[name] += ms_per_call(ways[name], device, repeats) / rounds
    llm._batch = None  # those steps ran the device's state ahead of the host's: the next step loads it again
    while llm.has_work():
        llm.step()
    return {name: round(ms, 4) for name, ms in spent.items()}


def by_range(values: list[float], bounds: list[int]) -> dict[str, float]:
    """Mean milliseconds of values[a:b] for consecutive bounds a, b."""
    return {f"{a}-{b}": round(1000 * sum(values[a:b]) / len(values[a:b]), 4)
            for a, b in itertools.pairwise(bounds) if values[a:b]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=512, help="sequences of the first run")
    parser.add_argument("--new", type=int, default=256, help="tokens each sequence generates")
    parser.add_argument("--reps", type=int, default=3, help="timed batch-1 generates")
    parser.add_argument("--engine", default="{}", help="engine options as JSON")
    parser.add_argument("--out")
    args = parser.parse_args()
    tokenizer, model = load_tokenizer(args.model), load_model(args.model, args.device)[0]
    texts = prompts(tokenizer, args.batch)
    params = SamplingParams(temperature=1.0, max_tokens=args.new, ignore_eos=True, seed=0)
    engine = EngineGenerator(model, tokenizer, kv_cache_tokens=args.batch * (args.new + 64),
                             max_num_seqs=args.batch, **json.loads(args.engine))
    seconds, _ = timed(partial(engine.generate, texts, params), model.device)
    result = {"engine": json.loads(args.engine), "tok_per_s": round(args.batch * args.new / seconds),
              "batch1_ms_per_decoded_token": per_token_ms(
                  lambda n: partial(engine.generate, texts[:1], dataclasses.replace(params, max_tokens=n)),
                  args.new, model.device), "runs": []}
    bounds = [0, 8, 32, 64, 128, 192, args.new]
    for _ in range(args.reps):
        steps = timed_steps(engine, texts[0], params)
        decode = [(s, w) for kind, s, w in steps if kind == "decode"]
        result["runs"].append({"prefill_ms": round(1000 * sum(s for kind, s, _ in steps if kind == "prefill"), 3),
                               "decode_steps": len(decode),
                               "step_ms": by_range([s for s, _ in decode], bounds),
                               "waiting_ms": by_range([w for _, w in decode], bounds)})
    if model.device.type == "cuda":
        result["replays"] = replays(engine, texts[0])
    emit(result, args.out)


if __name__ == "__main__":
    main()
