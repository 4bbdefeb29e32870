"""Host memory of loading a bf16 checkpoint for FSDP training (scale-out issue): each rank's peak resident memory
from `load_policy` through `fully_sharded`, with the policy loaded in fp32 (r1kit before commit 6ea3911: every rank a
whole fp32 copy) against its stored dtype (now: each layer made fp32 as it is sharded). A checkpoint loaded in its own
dtype is memory-mapped (file pages the ranks share) until sharding copies each layer out.

The checkpoint is big_checkpoint.py's random Qwen2 at a shape; the ranks are torchrun's, on the CPU (gloo), where
the shards stay in host memory, so a rank's peak also holds its fp32 shards: on a GPU they leave the host.
  python bench/fsdp_host_memory.py --shape 1.5b --out /tmp/q1b --json bench/results/fsdp_host_memory_cpu.json
  python bench/fsdp_host_memory.py --shape 1.5b --stored float32 --out /tmp/q1b32 \
      --json bench/results/fsdp_host_memory_fp32_checkpoint_cpu.json     # as a resume reads r1kit's checkpoints
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from bench_io import emit
from big_checkpoint import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM), in GB."""
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) / 1e6


def worker(folder: str, load: str, out: str) -> None:
    """torchrun's worker: load the policy as the trainers do under FSDP and shard it; write this rank's figures."""
    from r1kit import distributed
    from r1kit.rl.run import load_policy

    with distributed.launched("cpu"):
        world = distributed.world()
        started = time.perf_counter()
        # "float32": the whole model in fp32 on every rank's host, as before; "stored": as the trainers load for FSDP
        model, _ = load_policy(folder, "cpu", 0, 32, False, None, sharded=load == "stored")
        loaded_gb, loaded_s = peak_rss_gb(), time.perf_counter() - started
        distributed.fully_sharded(model, world, "cpu")
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
        local = sum(p.to_local().numel() * p.element_size() for p in model.parameters()) / 1e9
        shard_s = time.perf_counter() - started - loaded_s
        figures = {"rank": world.rank, "peak_rss_after_load_gb": round(loaded_gb, 2), "load_s": round(loaded_s, 1),
                   "peak_rss_after_shard_gb": round(peak_rss_gb(), 2), "shard_s": round(shard_s, 1),
                   "parameter_dtypes": dtypes, "local_shard_gb": round(local, 2)}
        Path(out, f"{load}-{world.rank}.json").write_text(json.dumps(figures))


def run(folder: Path, dtype: str, out: Path) -> list[dict]:
    """Both ranks' figures for one load dtype."""
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    __file__, "--worker", str(folder), dtype, str(out)], check=True, cwd=ROOT)
    return [json.loads((out / f"{dtype}-{rank}.json").read_text()) for rank in range(2)]


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1.5b")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint folder (kept if it exists)")
    parser.add_argument("--stored", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the checkpoint's dtype (r1kit's own checkpoints, which a resume reads, are float32)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    import torch

    result: dict = {"shape": args.shape, "stored": args.stored, "ranks": 2, "device": "cpu (gloo)"}
    if not (args.out / "config.json").is_file():
        result |= write_checkpoint(args.shape, args.out, torch.device("cpu"), getattr(torch, args.stored))
    figures = args.out.with_suffix(".figures")
    figures.mkdir(exist_ok=True)
    for dtype in ("float32", "stored"):
        result[f"load_{dtype}"] = run(args.out, dtype, figures)
    emit(result, args.json)


if __name__ == "__main__":
    main()
