"""A checkpoint at a distilled model's shape, written as sharded bf16 safetensors and served by `r1kit serve`:
time to ready, the load's own time and peak host RSS, and one answer's time to first token (serving issue).

The shapes are DeepSeek-R1-Distill-Qwen-1.5B, -7B, -14B and -32B's configs (Qwen2: biased q/k/v projections, untied
embeddings) with the vocabulary cut to the embedded model's 49,152 so its tokenizer serves them; the weights are
random (normal, std 0.02; norms 1, biases 0), made layer by layer (on the GPU when there is one) and written with
the GGUF import's shard writer, so the writer never holds more than one shard either.
  python bench/big_checkpoint.py --shape 14b --out /tmp/q14b --serve --json $OUT/serve_14b.json
  python bench/big_checkpoint.py --shape tiny --out /tmp/qtiny --serve --device cpu      # the CPU check
"""

from __future__ import annotations

import argparse
import json
import re
import time
import urllib.request
from pathlib import Path

import torch
from bench_io import emit
from serve_load import start_local

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, rope theta, rms eps
    "tiny": (64, 128, 2, 4, 2, 1e6, 1e-6),
    "1.5b": (1536, 8960, 28, 12, 2, 1e4, 1e-6),
    "7b": (3584, 18944, 28, 28, 4, 1e4, 1e-6),
    "14b": (5120, 13824, 48, 40, 8, 1e6, 1e-5),
    "32b": (5120, 27648, 64, 40, 8, 1e6, 1e-5),
}


def shape_config(shape: str):
    """A Qwen2 config of the shape, with the embedded model's vocabulary and special tokens."""
    from transformers import Qwen2Config

    hidden, intermediate, layers, heads, kv_heads, theta, eps = SHAPES[shape]
    return Qwen2Config(vocab_size=49152, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       rope_theta=theta, rms_norm_eps=eps, max_position_embeddings=32768, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2, dtype="bfloat16")


def random_tensors(config, device: torch.device):
    """(name, bf16 tensor on the CPU) for every parameter of the model, one at a time."""
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        skeleton = Qwen2ForCausalLM(config)
    generator = torch.Generator(device).manual_seed(0)
    for name, meta in skeleton.state_dict().items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(meta.shape, dtype=torch.bfloat16)
        elif name.endswith(".bias"):
            tensor = torch.zeros(meta.shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(meta.shape, generator=generator, device=device) * 0.02).to(torch.bfloat16).cpu()
        yield name, tensor


def write_checkpoint(shape: str, out: Path, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The shape's random checkpoint in out, stored in dtype (5 GB shards, config, the embedded model's
    tokenizer)."""
    from transformers import AutoTokenizer

    from r1kit.gguf_import import SHARD_BYTES, write_shards
    from r1kit.models import resolve_model

    out.mkdir(parents=True, exist_ok=True)
    config = shape_config(shape)
    started = time.perf_counter()
    total = write_shards(random_tensors(config, device), out, dtype, frozenset(), SHARD_BYTES)
    config.architectures, config.dtype = ["Qwen2ForCausalLM"], dtype
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_model("default")).save_pretrained(out)
    return {"shape": shape, "weights_gb": round(total / 1e9, 2), "shards": len(list(out.glob("*.safetensors"))),
            "write_s": round(time.perf_counter() - started, 1)}


def tree_peak_rss_gb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process plus its children, in GB (the engine runs in a child)."""
    def children(p: int) -> list[int]:
        found = []
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            found += [int(c) for c in task.read_text().split()]
        return found

    pids, total = [pid], 0
    while pids:
        p = pids.pop()
        status = Path(f"/proc/{p}/status").read_text()
        total += int(re.search(r"VmHWM:\s+(\d+) kB", status)[1])
        pids += children(p)
    return round(total / 1e6, 2)


def serve(folder: Path, device: str, log_path: Path) -> dict:
    """Start `r1kit serve --model folder`, time it to ready, ask one question, stop it."""
    started = time.perf_counter()
    url, proc = start_local(str(folder), device, kv_cache_tokens=65536, log_path=str(log_path), timeout_s=1800)
    ready_s = time.perf_counter() - started
    try:
        peak = tree_peak_rss_gb(proc.pid)
        body = json.dumps({"model": folder.name, "max_tokens": 16, "stream": False,
                           "messages": [{"role": "user", "content": "What is 2 + 3?"}]}).encode()
        request = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        asked = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            usage = json.load(response)["usage"]
        answer_s = time.perf_counter() - asked
    finally:
        proc.terminate()
        proc.wait(60)
    loaded = re.search(r"loaded .* in ([\d.]+) s \(peak host RSS ([\d.]+) GB; while loading, at most ([\d.]+) GB "
                       r"anonymous and ([\d.]+) GB", log_path.read_text())
    return {"ready_s": round(ready_s, 1), "load_s": loaded and float(loaded[1]),
            "load_peak_rss_gb": loaded and float(loaded[2]), "load_peak_anonymous_gb": loaded and float(loaded[3]),
            "load_peak_mapped_files_gb": loaded and float(loaded[4]), "server_tree_peak_rss_gb": peak,
            "answer_16_tokens_s": round(answer_s, 3), "usage": usage}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="14b")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint folder (kept if it exists)")
    parser.add_argument("--serve", action="store_true", help="then serve it and report time to ready and RSS")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    result: dict = {"shape": args.shape}
    if not (args.out / "config.json").is_file():
        device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
        result |= write_checkpoint(args.shape, args.out, device)
    if args.serve:
        result |= serve(args.out, args.device, args.out.with_suffix(".serve.log"))
    emit(result, args.json)


if __name__ == "__main__":
    main()
