"""`r1kit sft` against TRL's SFTTrainer: training tokens per second on the same model, data, sequence length and
examples per optimizer step, in one process.

Data: GSM8K train rows turned into cold-start traces (prompt = problem, reasoning = solution without its <<...>>
calculator notes, answer = \\boxed{answer}); rows longer than --max-seq-len tokens are left out on both sides.
r1kit trains on them as `r1kit sft` does (template chat: the chat template with the reasoning system prompt; loss
on the completion `<think>...</think>answer<|im_end|>` only). TRL gets the same conversation as prompt-completion
messages (prompt: system + user, completion: the assistant turn), completion_only_loss=True, and the same token
ids (checked: `token_check` in the JSON). Both: fp32 master weights, bf16 autocast on GPU, AdamW (adamw_torch),
constant lr 1e-5, grad clip 1.0, no gradient checkpointing, the model's default attention (sdpa).

Rows (--settings):
  r1kit-packed      `r1kit sft` as it runs: a step's --batch-size examples packed without padding into rows of
                    --micro-batch-tokens tokens (position ids restart per example)
  r1kit-padded      `r1kit sft` with packing=False: padded length buckets of at most --micro-batch-tokens tokens
  trl-padding-free  padding_free=True: per_device_train_batch_size examples (--trl-micro-batch, default
                    micro_batch_tokens // max_seq_len: at most r1kit's micro-batch tokens whatever the lengths)
                    flattened into one row, gradient accumulation up to --batch-size examples per optimizer step.
                    r1kit fills a micro-batch up to micro_batch_tokens instead, so with short rows it runs fewer,
                    larger micro-batches: --trl-micro-batch 64 gives TRL the same
  trl-packing       packing=True (BFD, dataset packed into rows of max_length=--max-seq-len tokens, padding-free
                    within a micro-batch); a TRL step is a number of packed rows, chosen so that it holds about
                    --batch-size examples (the measured examples per step are reported)
  trl-padded        plain right-padded batches, same micro-batch and accumulation as trl-padding-free

What is timed: r1kit: `tokens_per_s` and `step_s` of metrics.jsonl (all tokens of the step's examples over the
synchronized wall time of SFTTrainer.step: batching, forward/backward, clip, optimizer). TRL: a TrainerCallback,
CUDA synchronized at on_step_begin and on_step_end (forward/backward of every micro-batch, clip, optimizer; the
dataloader's prefetch of the step's micro-batches falls before on_step_begin and is not in it); tokens are the
non-padding input tokens of the step's micro-batches (attention mask sum; for padding-free rows, the flattened
row's length), the same definition as r1kit's. Medians over the steps after --warmup. `wall` columns are tokens
over the time from one step's end to the next (data loading, logging and all else included).

GPU (H200), after ../shared/device/stage.sh's two calls (trl, datasets, the model and data staged):
    source /root/models/env.sh && source bench/device_env.sh && python bench/sft_speed.py   # -> $OUT/sft_speed.json
CPU smoke:   python bench/sft_speed.py --model tiny --rows 64 --steps 3 --batch-size 8 --micro-batch-tokens 2048 \\
                 --warmup 1 --out-json /tmp/sft_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from bench_io import save_json
from rich.console import Console
from transformers import TrainerCallback

from r1kit.config import SFTConfig
from r1kit.models import load_tokenizer, resolve_model
from r1kit.prompts import REASONING_SYSTEM_PROMPT
from r1kit.sft.data import encode_segments, row_segments, trace_completion
from r1kit.sft.run import run_sft

SETTINGS = ("r1kit-packed", "r1kit-padded", "trl-padding-free", "trl-packing", "trl-padded")
CALCULATOR = re.compile(r"<<[^>]*>>")
TEMPLATE = "chat"  # the chat template with the reasoning system prompt, on both sides


def default_data() -> str:
    """$R1_DEVICE_DATA/gsm8k_train.jsonl on the GPU machine, else the checkout's ../shared/data."""
    if os.environ.get("R1_DEVICE_DATA"):
        return str(Path(os.environ["R1_DEVICE_DATA"]) / "gsm8k_train.jsonl")
    return str(Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_train.jsonl")


def tiny_model(folder: Path) -> Path:
    """A 2-layer random Llama with the embedded model's tokenizer (for smoke tests on CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(str(resolve_model("default")))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_traces(src: str, rows: int, tokenizer, max_len: int) -> tuple[list[dict], list[tuple[list[int], list[bool]]],
                                                                     int]:
    """(trace rows, r1kit's (token ids, trainable) of each, rows left out as longer than max_len)."""
    traces, encoded, too_long = [], [], 0
    with open(src, encoding="utf-8") as f:
        for line in f:
            if len(traces) >= rows:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            reasoning = CALCULATOR.sub("", row.get("solution") or "")
            trace = {"prompt": row["problem"], "reasoning": reasoning, "answer": f"\\boxed{{{row['answer']}}}"}
            ids, trainable = encode_segments(row_segments(trace, TEMPLATE, tokenizer), tokenizer)
            if len(ids) > max_len:
                too_long += 1
                continue
            traces.append(trace)
            encoded.append((ids, trainable))
    if not traces:
        raise SystemExit(f"{src}: no usable rows")
    return traces, encoded, too_long


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


def summarize(steps: list[dict], warmup: int) -> dict:
    """Medians over the steps after warm-up (all steps when there are no more than `warmup`)."""
    kept = steps[warmup:] if len(steps) > warmup else steps
    walls = [s["tokens"] / s["interval_s"] for s in kept if s.get("interval_s")]
    return {"steps": len(steps), "steps_measured": len(kept),
            "tokens_per_s": round(statistics.median(s["tokens"] / s["step_s"] for s in kept), 1),
            "step_s": round(statistics.median(s["step_s"] for s in kept), 4),
            "wall_tokens_per_s": round(statistics.median(walls), 1) if walls else None,
            "examples_per_step": round(statistics.mean(s["examples"] for s in kept), 2),
            "tokens_per_step": round(statistics.mean(s["tokens"] for s in kept), 1),
            "padding_share": round(1 - sum(s["tokens"] for s in kept) / sum(s["fed"] for s in kept), 4),
            "per_step": [{k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()} for s in steps]}


class StepTimer(TrainerCallback):
    """Synchronized wall time, tokens and examples of each optimizer step of a TRL run."""

    def __init__(self):
        self.steps: list[dict] = []
        self.pending: list[tuple] = []  # (tokens, examples, tokens with padding) of this step's micro-batches
        self.last_end: float | None = None
        self.start = 0.0

    def record(self, inputs) -> None:
        """Count a micro-batch (device tensors, read at the step's end: no extra synchronization)."""
        ids = inputs["input_ids"]
        if inputs.get("attention_mask") is not None:
            tokens, examples = inputs["attention_mask"].sum(), ids.shape[0]
        else:  # padding-free: one flattened row, position ids restarting at each example
            positions = inputs["position_ids"]
            tokens, examples = positions.numel(), (positions == 0).sum()
        self.pending.append((tokens, examples, ids.numel()))

    def on_step_begin(self, args, state, control, **kwargs):
        sync()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        now = time.perf_counter()
        self.steps.append({"step_s": now - self.start,
                           "interval_s": now - self.last_end if self.last_end is not None else None,
                           "tokens": sum(int(t) for t, _, _ in self.pending),
                           "examples": sum(int(e) for _, e, _ in self.pending),
                           "fed": sum(f for _, _, f in self.pending), "micro_batches": len(self.pending)})
        self.pending, self.last_end = [], now


def run_r1kit(args, model: str, data: str, packing: bool, workdir: Path) -> dict:
    """One `r1kit sft` run; its steps from metrics.jsonl."""
    out = workdir / ("r1kit-packed" if packing else "r1kit-padded")
    cfg = SFTConfig(model=model, data=data, eval_rows=0, template=TEMPLATE, max_seq_len=args.max_seq_len,
                    packing=packing, batch_size=args.batch_size, micro_batch_tokens=args.micro_batch_tokens,
                    steps=args.steps, lr=1e-5, lr_schedule="constant", warmup_steps=0, save_every=0, out=str(out))
    reset_memory()
    run_sft(cfg, Console(stderr=True))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "tokens_per_s" in r]
    steps, last = [], 0.0
    for r in rows:
        steps.append({"step_s": r["step_s"], "interval_s": r["train_s"] - last, "tokens": r["tokens"],
                      "examples": args.batch_size, "fed": r["tokens"] / (1 - r["padding_share"]),
                      "loss": r["loss"]})
        last = r["train_s"]
    result = summarize(steps, args.warmup)
    gpu = [r["gpu_memory_gb"] for r in rows if "gpu_memory_gb" in r]
    result["peak_gpu_memory_gb"] = round(max(gpu), 3) if gpu else None
    result["micro_batch"] = f"{args.micro_batch_tokens} tokens" + ("" if packing else " (padded)")
    return result


def trl_micro_batch(args) -> tuple[int, int]:
    """(examples per micro-batch, gradient accumulation) so that a step is --batch-size examples: the largest divisor
    of batch_size up to --trl-micro-batch, by default micro_batch_tokens // max_seq_len (at most r1kit's
    micro_batch_tokens padded tokens, whatever the lengths)."""
    cap = max(1, min(args.batch_size, args.trl_micro_batch or args.micro_batch_tokens // args.max_seq_len))
    micro = next(d for d in range(cap, 0, -1) if args.batch_size % d == 0)
    return micro, args.batch_size // micro


def make_config(cls, kwargs: dict, required: set[str]) -> tuple[Any, list[str]]:
    """trl.SFTConfig(**kwargs) without the arguments this version lacks (max_length is max_seq_length before
    TRL 0.20)."""
    kwargs, dropped = dict(kwargs), []
    while True:
        try:
            return cls(**kwargs), dropped
        except TypeError as e:
            found = re.search(r"unexpected keyword argument '(\w+)'", str(e))
            name = found.group(1) if found else None
            if name not in kwargs:
                raise
            if name in required:
                raise RuntimeError(f"this TRL's SFTConfig has no {name!r}") from e
            value = kwargs.pop(name)
            if name == "max_length":
                kwargs["max_seq_length"] = value
            dropped.append(name)


def run_trl(args, model_dir: Path, traces: list[dict], encoded: list, setting: str, workdir: Path) -> dict:
    """One TRL SFTTrainer run in the given setting; its timed steps."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    micro, accum = trl_micro_batch(args)
    notes: list[str] = []
    if setting == "trl-packing":
        mean_len = statistics.mean(len(ids) for ids, _ in encoded)
        rows_per_step = max(1, round(args.batch_size * mean_len / args.max_seq_len))
        micro = max(1, min(rows_per_step, args.trl_micro_batch or args.micro_batch_tokens // args.max_seq_len))
        accum = math.ceil(rows_per_step / micro)
        notes.append(f"a step is {micro * accum} packed rows of <= {args.max_seq_len} tokens ({micro} per "
                     f"micro-batch x {accum}), sized to hold ~{args.batch_size} examples of mean length "
                     f"{mean_len:.0f}")
    kwargs = dict(output_dir=str(workdir / setting), per_device_train_batch_size=micro,
                  gradient_accumulation_steps=accum, max_steps=args.steps, learning_rate=1e-5,
                  lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", weight_decay=0.0,
                  max_grad_norm=1.0, bf16=cuda, logging_steps=1, save_strategy="no", report_to=[],
                  gradient_checkpointing=False, completion_only_loss=True, max_length=args.max_seq_len, seed=0,
                  dataloader_num_workers=0, disable_tqdm=True)
    required = set()
    if setting == "trl-padding-free":
        kwargs["padding_free"] = True
        required = {"padding_free"}
    elif setting == "trl-packing":
        kwargs.update(packing=True, packing_strategy="bfd")
        required = {"packing"}
    sft_config, dropped = make_config(trl.SFTConfig, kwargs, required)
    if dropped:
        notes.append(f"SFTConfig arguments this TRL lacks, left out: {', '.join(dropped)}")

    data = Dataset.from_list([{"prompt": [{"role": "system", "content": REASONING_SYSTEM_PROMPT},
                                          {"role": "user", "content": t["prompt"]}],
                               "completion": [{"role": "assistant",
                                               "content": trace_completion(t["reasoning"], t["answer"])}]}
                              for t in traces])
    timer = StepTimer()

    class CountingSFTTrainer(trl.SFTTrainer):
        """SFTTrainer that hands each micro-batch to the timer before training on it."""

        def training_step(self, model, inputs, *rest, **kw):
            timer.record(inputs)
            return super().training_step(model, inputs, *rest, **kw)

    reset_memory()
    tokenizer = load_tokenizer(str(model_dir))

    def build():
        """A trainer on a freshly loaded fp32 model (a refused attempt may have patched the last one)."""
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if cuda:
            model = model.to("cuda")
        try:
            return CountingSFTTrainer(model=model, args=sft_config, train_dataset=data, processing_class=tokenizer,
                                      callbacks=[timer])
        except TypeError as e:  # TRL before 0.12 took the tokenizer as `tokenizer`
            if "processing_class" not in str(e):
                raise
            return CountingSFTTrainer(model=model, args=sft_config, train_dataset=data, tokenizer=tokenizer,
                                      callbacks=[timer])

    try:
        trainer = build()
    except ValueError as e:
        # TRL 1.x refuses padding_free without packing while max_length is set (it would not truncate);
        # every row already fits max_seq_len, so no limit is the same data
        if not (setting == "trl-padding-free" and "max_length" in str(e)):
            raise
        sft_config.max_length = None
        notes.append(f"max_length=None (TRL: {str(e).splitlines()[0][:120]}); rows already fit max_seq_len")
        reset_memory()
        trainer = build()
    check = token_check(trainer.train_dataset, encoded) if setting != "trl-packing" else None
    packed_rows = len(trainer.train_dataset) if setting == "trl-packing" else None
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    result = summarize(timer.steps, args.warmup)
    result.update(peak_gpu_memory_gb=peak_memory_gb(), train_s=round(train_s, 2),
                  micro_batch=f"{micro} {'packed rows' if setting == 'trl-packing' else 'examples'} x {accum} "
                              "accumulation",
                  attn_implementation=getattr(trainer.model.config, "_attn_implementation", None),
                  trainer_padding_free=getattr(trainer, "padding_free", None),
                  gradient_checkpointing=getattr(trainer.args, "gradient_checkpointing", None), notes=notes)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for step, loss in zip(result["per_step"], losses, strict=False):
        step["loss"] = loss
    if check is not None:
        result["token_check"] = check
    if packed_rows is not None:
        result["packed_rows"] = packed_rows
        result["examples_per_packed_row"] = round(len(traces) / packed_rows, 2)
    del trainer
    reset_memory()
    return result


def token_check(dataset, encoded: list) -> dict:
    """How many of TRL's tokenized rows have exactly r1kit's token ids and loss mask."""
    same_ids = same_mask = 0
    trl_tokens = 0
    for row, (ids, trainable) in zip(dataset, encoded, strict=False):
        trl_tokens += len(row["input_ids"])
        if list(row["input_ids"]) == ids:
            same_ids += 1
            if "labels" in row and [label != -100 for label in row["labels"]][1:] == trainable[1:]:
                same_mask += 1
    return {"rows": len(dataset), "r1kit_rows": len(encoded), "same_token_ids": same_ids,
            "same_ids_and_loss_mask": same_mask, "trl_tokens": trl_tokens,
            "r1kit_tokens": sum(len(ids) for ids, _ in encoded)}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "trl", "datasets", "accelerate", "r1kit"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def table(result: dict) -> str:
    runs = result["runs"]
    lines = [f"{'system':6} {'setting':13} {'tok/s':>10} {'wall tok/s':>10} {'step s':>8} {'ex/step':>7} "
             f"{'tok/step':>8} {'pad':>5} {'GPU GB':>7} {'r1kit/TRL':>9}"]
    base = runs.get("r1kit-packed", {}).get("tokens_per_s")
    for name in result["settings"]["settings"]:
        run = runs.get(name, {})
        system, setting = name.split("-", 1)
        if "error" in run:
            lines.append(f"{system:6} {setting:13} failed: {run['error'][:90]}")
            continue
        ratio = f"{base / run['tokens_per_s']:.2f}" if system == "trl" and base else ""
        gpu = run.get("peak_gpu_memory_gb")
        wall = run.get("wall_tokens_per_s")
        lines.append(f"{system:6} {setting:13} {run['tokens_per_s']:>10,.0f} "
                     f"{f'{wall:,.0f}' if wall else '-':>10} {run['step_s']:>8.3f} {run['examples_per_step']:>7.1f} "
                     f"{run['tokens_per_step']:>8.0f} {run['padding_share']:>5.2f} "
                     f"{f'{gpu:.2f}' if gpu is not None else '-':>7} {ratio:>9}")
    padded, trl_padded = runs.get("r1kit-padded", {}), runs.get("trl-padded", {})
    if "tokens_per_s" in padded and "tokens_per_s" in trl_padded:
        lines.append(f"r1kit/TRL, both padded: {padded['tokens_per_s'] / trl_padded['tokens_per_s']:.2f}")
    lines.append("r1kit/TRL: r1kit-packed tok/s over the TRL row's; tok/s: medians after warm-up, "
                 "synchronized step time; wall: step end to step end")
    for name, run in runs.items():
        if "micro_batch" in run:
            check = run.get("token_check")
            same = f"; token ids and loss mask = r1kit's in {check['same_ids_and_loss_mask']}/{check['rows']} rows" \
                if check else ""
            lines.append(f"  {name}: micro-batch {run['micro_batch']}{same}")
        lines += [f"  {name}: {note}" for note in run.get("notes", [])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="'default', an HF folder, or 'tiny' (2-layer random "
                        "Llama on the embedded tokenizer, for smoke tests)")
    parser.add_argument("--data", default=default_data(), help="GSM8K train JSONL (problem, answer, solution)")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64, help="examples per optimizer step")
    parser.add_argument("--micro-batch-tokens", type=int, default=16384, help="r1kit's tokens per forward/backward")
    parser.add_argument("--trl-micro-batch", type=int, default=None, help="TRL's per_device_train_batch_size "
                        "(examples; packed rows with packing); default micro_batch_tokens // max_seq_len")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    out_default = str(Path(os.environ["OUT"]) / "sft_speed.json") if os.environ.get("OUT") else None
    parser.add_argument("--out-json", default=out_default, help="default: $OUT/sft_speed.json when $OUT is set")
    args = parser.parse_args()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings: {', '.join(sorted(unknown))}")

    workdir = Path(tempfile.mkdtemp(prefix="sft_speed-"))
    model = str(tiny_model(workdir / "tiny")) if args.model == "tiny" else args.model
    model_dir = resolve_model(model)
    tokenizer = load_tokenizer(str(model_dir))
    traces, encoded, too_long = build_traces(args.data, args.rows, tokenizer, args.max_seq_len)
    data = workdir / "traces.jsonl"
    data.write_text("".join(json.dumps(t) + "\n" for t in traces))
    lengths = [len(ids) for ids, _ in encoded]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    result: dict[str, Any] = {
        "device": device, "versions": versions(), "python": sys.version.split()[0],
        "settings": {**{k: v for k, v in vars(args).items() if k != "settings"}, "settings": settings,
                     "model_dir": str(model_dir), "template": TEMPLATE, "lr": 1e-5, "optimizer": "AdamW",
                     "precision": "fp32 weights, bf16 autocast" if torch.cuda.is_available() else "fp32 (CPU)",
                     "trl_micro_batch": "x".join(map(str, trl_micro_batch(args)))},
        "data": {"rows": len(traces), "too_long_left_out": too_long, "tokens": sum(lengths),
                 "mean_tokens": round(statistics.mean(lengths), 1), "max_tokens": max(lengths),
                 "target_tokens": sum(sum(t[1:]) for _, t in encoded)},
        "runs": {},
    }
    for name in settings:
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            if name.startswith("r1kit"):
                run = run_r1kit(args, model, str(data), name == "r1kit-packed", workdir)
            else:
                run = run_trl(args, model_dir, traces, encoded, name, workdir)
        except Exception as e:  # a setting this TRL / torch refuses: record why and go on
            traceback.print_exc()
            run = {"error": f"{type(e).__name__}: {e}".strip()}
            reset_memory()
        result["runs"][name] = run
        save_json(result, args.out_json)
    base = result["runs"].get("r1kit-packed", {}).get("tokens_per_s")
    result["ratios"] = {f"r1kit-packed/{name}": round(base / run["tokens_per_s"], 3)
                        for name, run in result["runs"].items() if name.startswith("trl") and base and
                        "tokens_per_s" in run}
    if "tokens_per_s" in result["runs"].get("r1kit-padded", {}) and "tokens_per_s" in result["runs"].get(
            "trl-padded", {}):
        result["ratios"]["r1kit-padded/trl-padded"] = round(
            result["runs"]["r1kit-padded"]["tokens_per_s"] / result["runs"]["trl-padded"]["tokens_per_s"], 3)
    save_json(result, args.out_json)
    print(f"\nfigures: {args.out_json or '(not saved: no --out-json or $OUT)'}  device: {device}  "
          f"versions: {' '.join(f'{k} {v}' for k, v in result['versions'].items())}")
    print(table(result), flush=True)


if __name__ == "__main__":
    main()
