"""FSDP2 full fine-tuning of a model too big for one GPU's fp32 weights, gradients and Adam state (scale-out issue):
a few `r1kit sft` steps under torchrun, each rank's step time and peak GPU memory, and no checkpoint written (a 14B
model's fp32 weights and Adam state are ~168 GB of files). The model is big_checkpoint.py's random one at a
distilled model's shape; the data are synthetic traces of about --tokens tokens each.
  python bench/big_checkpoint.py --shape 14b --out /tmp/q14b
  torchrun --nproc-per-node 2 bench/fsdp_sft_step.py /tmp/q14b --json $OUT/fsdp_sft_14b.json
  torchrun --nproc-per-node 2 bench/fsdp_sft_step.py /tmp/qtiny --device cpu       # the CPU check (tiny shape)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_io import emit
from fsdp_host_memory import peak_rss_gb


def write_traces(path: Path, rows: int, tokens: int) -> None:
    """Synthetic SFT traces of about `tokens` tokens each (a number's words repeated)."""
    reasoning = " ".join(["one two three"] * (tokens // 3))
    path.write_text("".join(json.dumps({"prompt": f"Count to {i}.", "reasoning": reasoning,
                                        "answer": f"\\boxed{{{i}}}"}) + "\n" for i in range(rows)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an HF checkpoint folder (big_checkpoint.py writes one)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (the first includes warm-up)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples a step, over all ranks")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens an example, about")
    parser.add_argument("--micro-batch-tokens", type=int, default=2048)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the figures here (rank 0)")
    args = parser.parse_args()

    from r1kit import distributed
    from r1kit.config import SFTConfig
    from r1kit.models import pick_device
    from r1kit.rl.run import load_policy
    from r1kit.sft.data import load_examples
    from r1kit.sft.trainer import SFTTrainer

    data = Path(f"/tmp/fsdp_sft_step_traces_{args.tokens}.jsonl")
    with distributed.launched(args.device) as device:
        device = str(pick_device(device))  # `auto` comes back as it is in one process
        world = distributed.world()
        if world.is_main and not data.exists():
            write_traces(data, 64, args.tokens)
        world.barrier()
        cfg = SFTConfig(model=args.model, data=str(data), parallel="fsdp", gradient_checkpointing=True,
                        batch_size=args.batch_size, micro_batch_tokens=args.micro_batch_tokens,
                        max_seq_len=args.tokens + 256, steps=args.steps, lr=1e-5, warmup_steps=0, device=device)
        started = time.perf_counter()
        model, tokenizer = load_policy(args.model, device, 0, 32, True, sharded=world.size > 1)  # as sft loads
        examples = load_examples(cfg.data, tokenizer, cfg.template, cfg.max_seq_len)[0]
        trainer = SFTTrainer(cfg, model, tokenizer, examples, device)
        ready_s = time.perf_counter() - started
        parameters = sum(p.numel() for p in model.parameters())
        steps = [trainer.step() for _ in range(args.steps)]
        cuda = device.startswith("cuda")
        mine = {"rank": world.rank, "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
                if cuda else None, "peak_host_rss_gb": round(peak_rss_gb(), 2)}
        ranks = world.gather(mine)
        if world.is_main:
            emit({"model": args.model, "parameters": parameters, "ranks": world.size, "device": device,
                  "gpu": torch.cuda.get_device_name(device) if cuda else None, "ready_s": round(ready_s, 1),
                  "settings": {"batch_size": args.batch_size, "tokens": args.tokens,
                               "micro_batch_tokens": args.micro_batch_tokens, "gradient_checkpointing": True},
                  "steps": [{k: v for k, v in s.items() if k in ("loss", "step_s", "tokens_per_s", "grad_norm")}
                            for s in steps], "ranks_memory": ranks}, args.json)


if __name__ == "__main__":
    main()
