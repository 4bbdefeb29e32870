"""Data-parallel GRPO and SFT (DDP or FSDP), and evaluation, under torchrun on CPU (gloo, 2 processes, the tiny random
model): an update over two ranks equals one process's over the union batch, a run trains, checkpoints and resumes as
a one-process run does (on one node or two), FSDP shards what it should, and an evaluation split over ranks writes
what one process writes.

Run as a script by torchrun (`file.py WORKER ARGS...`), this file is also the workers of the tests below."""

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("_s", "tokens_per_s")
# the update test's cases: (config overrides, which groups each of the 2 ranks holds)
CASES = {
    "grpo": ({"loss_type": "grpo"}, [[0, 1], [2, 3]]),
    "dapo": ({"loss_type": "dapo", "advantage_scale": "batch", "num_iterations": 2}, [[0, 1], [2, 3]]),
    "empty_rank": ({"loss_type": "dapo"}, [[0, 1], []]),  # dynamic sampling can leave a rank no group
    # sharded, rank 1 running idle forwards and backwards (policy and reference) to match rank 0's 4; a small lr, as
    # Adam's first step turns float noise in a gradient near 0 into up to lr (see recorded_grads)
    "fsdp": ({"loss_type": "dapo", "advantage_scale": "batch", "parallel": "fsdp", "beta": 0.1,
              "old_logprobs": "recompute", "lr": 1e-3}, [[0, 1, 2], []]),
}


REWARD = '''
def vowels(completions, **kw):
    """Varies from sample to sample even for a random model, so every group carries signal."""
    return [sum(ch in "aeiou" for ch in c) / (1 + len(c)) for c in completions]
'''


def base_config(model_dir, folder: Path, out: str = "run", **kw):
    """A small GRPO config; its reward in folder/toy_rewards.py, written when missing; its run in folder/out."""
    from r1kit.config import TrainConfig

    reward = folder / "toy_rewards.py"
    if not reward.exists():
        reward.write_text(REWARD)
    base = dict(model=str(model_dir), out=str(folder / out), task="addition", group_size=4, prompts_per_step=4,
                max_completion_tokens=6, steps=2, eval_problems=0, lr=1e-2, device="cpu", save_every=1,
                rewards={f"{reward}:vowels": 1.0}, micro_batch_size=3, seed=3)
    return TrainConfig(**{**base, **kw})


def make_trainer(cfg):
    from r1kit import distributed
    from r1kit.rewards import build_rewards
    from r1kit.rl.run import build_tasks, build_trainer

    torch.manual_seed(cfg.seed)
    train, _ = build_tasks(cfg)
    return build_trainer(cfg, distributed.world(), cfg.device, None, train, build_rewards(cfg.rewards, train.reward))[0]


def groups(batch, keep: list[int], g: int):
    """The Rollouts of the groups `keep` of a batch."""
    from r1kit.rl.trainer import Rollouts

    seqs = [j * g + k for j in keep for k in range(g)]
    return Rollouts(rows=[batch.rows[j] for j in keep], prompt_ids=[batch.prompt_ids[j] for j in keep],
                    completions=[batch.completions[i] for i in seqs], rewards=batch.rewards[seqs],
                    per_reward={name: [v[i] for i in seqs] for name, v in batch.per_reward.items()})


def whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor, or an FSDP shard gathered whole (every rank must call it alike)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.clone()


def recorded_grads(trainer) -> list[dict[str, torch.Tensor]]:
    """The gradient of each optimizer step the trainer takes, filled in as it takes them (compared rather than the
    weights: Adam's first step is lr * sign(gradient), which makes float noise in a gradient near 0 a whole step)."""
    seen: list[dict[str, torch.Tensor]] = []
    trainer.optimizer.register_step_pre_hook(
        lambda *_: seen.append({k: whole(p.grad) for k, p in trainer.model.named_parameters()}))
    return seen


def update_worker(model_dir: str, folder: str) -> None:
    """torchrun's worker: each rank updates a fresh trainer on its groups of the saved batch, for every case."""
    from r1kit import distributed

    batch = torch.load(Path(folder) / "batch.pt", weights_only=False)
    with distributed.launched("cpu"):
        rank = distributed.world().rank
        for name, (overrides, shares) in CASES.items():
            trainer = make_trainer(base_config(model_dir, Path(folder), **overrides))
            grads = recorded_grads(trainer)
            update = trainer.update(groups(batch, shares[rank], 4))
            params = {k: whole(v.detach()) for k, v in trainer.model.named_parameters()}
            torch.save({"update": update, "grads": grads, "params": params}, Path(folder) / f"{name}-{rank}.pt")


def env() -> dict[str, str]:
    """This checkout first on the path (another r1kit may be installed), one thread a process on a shared CPU."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*cmd: str, timeout: float = 240) -> None:
    """A Python command line in this checkout, one process or several, which must succeed."""
    done = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def torchrun(*args: str, nodes: int = 1, timeout: float = 240) -> None:
    """args under torchrun: one node of 2 processes, or `nodes` nodes of one as on a cluster, each its own torchrun
    (here on one machine), meeting at a c10d rendezvous."""
    if nodes == 1:
        run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args, timeout=timeout)
        return
    endpoint = f"127.0.0.1:{free_port()}"
    # no --node-rank: c10d numbers the nodes as they join (torchrun ignores it for any but a static rendezvous)
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                                "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, *args],
                               cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(nodes)]
    try:
        for agent in agents:
            output = agent.communicate(timeout=timeout)[0]
            assert agent.returncode == 0, output[-8000:]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()


def command(name: str, cfg) -> list[str]:
    """`-m r1kit.cli NAME --config FILE` for cfg, its YAML beside its run folder."""
    path = Path(cfg.out).with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    return ["-m", "r1kit.cli", name, "--config", str(path)]


def test_an_update_over_two_ranks_equals_one_process_on_the_union_batch(tiny_model_dir, tmp_path):
    from r1kit.rl.trainer import SAME_ON_EVERY_RANK

    batch = make_trainer(base_config(tiny_model_dir, tmp_path)).collect()
    assert len(batch.rows) == 4 and batch.rewards.std() > 0
    torch.save(batch, tmp_path / "batch.pt")
    torchrun(__file__, "update_worker", str(tiny_model_dir), str(tmp_path))
    for name, (overrides, shares) in CASES.items():
        alone = make_trainer(base_config(tiny_model_dir, tmp_path, **overrides))
        grads = recorded_grads(alone)
        expected = alone.update(groups(batch, shares[0] + shares[1], 4))
        ranks = [torch.load(tmp_path / f"{name}-{r}.pt") for r in range(2)]
        assert len(grads) == len(ranks[0]["grads"]) == overrides.get("num_iterations", 1)
        for mine, theirs in zip(grads, ranks[0]["grads"], strict=True):
            for key, grad in mine.items():
                torch.testing.assert_close(theirs[key], grad, atol=1e-7, rtol=1e-4, msg=f"{name}: {key}")
        for key, param in alone.model.named_parameters():  # the ranks never part
            assert torch.equal(ranks[0]["params"][key], ranks[1]["params"][key]), (name, key)
            torch.testing.assert_close(ranks[0]["params"][key], param.detach(), atol=5e-5, rtol=1e-4)
        assert set(ranks[0]["update"]) | set(ranks[1]["update"]) == set(expected)
        for key, value in expected.items():
            got = (ranks[0]["update"][key] if key in SAME_ON_EVERY_RANK
                   else sum(r["update"].get(key, 0.0) for r in ranks))
            assert got == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)
        assert expected["skipped"] == 0.0 and expected["grad_norm"] > 0


def steps(run: Path, metric: str = "reward") -> list[dict]:
    """A run's rows of training steps (those with `metric`: GRPO's reward, SFT's loss), without their timings."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(TIMING)} for r in rows if metric in r]


def assert_rows_close(got: list[dict], expected: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


def assert_weights_close(a: Path, b: Path) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(x[key], y[key], atol=5e-5, rtol=1e-4, msg=key)  # Adam: see recorded_grads


def test_torchrun_train_matches_one_process_with_ddp_or_fsdp_and_resumes_across_world_sizes(tiny_model_dir, tmp_path):
    from r1kit.rl.run import run_train

    # one process, 3 steps: the reference
    one = base_config(tiny_model_dir, tmp_path, "one", prompts_per_step=2, steps=3, keep_checkpoints=3)
    run_train(one)
    # two processes, 2 steps; then one process resumes it for the 3rd
    two = base_config(tiny_model_dir, tmp_path, "two", prompts_per_step=2, steps=2, keep_checkpoints=3)
    torchrun(*command("train", two))
    folder = tmp_path / "two"
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert not list(tmp_path.glob("two.old-*")) and (folder / "final" / "model.safetensors").is_file()
    assert_rows_close(steps(folder), steps(tmp_path / "one")[:2])
    assert_weights_close(folder / "checkpoints" / "step-2", tmp_path / "one" / "checkpoints" / "step-2")
    run_train(two.model_copy(update={"steps": 3, "resume": "latest"}))
    assert_rows_close(steps(folder), steps(tmp_path / "one"))
    assert_weights_close(folder / "checkpoints" / "step-3", tmp_path / "one" / "checkpoints" / "step-3")
    # and two processes resume a one-process checkpoint
    three = two.model_copy(update={"out": str(tmp_path / "three"), "steps": 3,
                                   "resume": str(tmp_path / "one" / "checkpoints" / "step-2")})
    torchrun(*command("train", three))
    assert_rows_close(steps(tmp_path / "three"), steps(tmp_path / "one")[2:])
    assert_weights_close(tmp_path / "three" / "final", tmp_path / "one" / "final")
    # FSDP over 2 processes for 2 steps (each rank's generator reading weights gathered after every update), then
    # one process resumes it for the 3rd
    fsdp = two.model_copy(update={"out": str(tmp_path / "fsdp"), "parallel": "fsdp"})
    torchrun(*command("train", fsdp))
    assert_rows_close(steps(tmp_path / "fsdp"), steps(tmp_path / "one")[:2])
    assert_weights_close(tmp_path / "fsdp" / "final", tmp_path / "one" / "checkpoints" / "step-2")
    run_train(fsdp.model_copy(update={"steps": 3, "resume": "latest"}))
    assert_rows_close(steps(tmp_path / "fsdp"), steps(tmp_path / "one"))
    assert_weights_close(tmp_path / "fsdp" / "final", tmp_path / "one" / "final")


def sft_settings(model_dir, folder: Path) -> dict:
    """A small SFT run's settings, its traces in folder/traces.jsonl (written when missing): 3 examples a step in
    micro-batches of about one, so that rank 0 trains on two and rank 1 on one."""
    data = folder / "traces.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?",
                                            "reasoning": f"{i} and {i} make {2 * i}" * (1 + i % 3),
                                            "answer": f"\\boxed{{{2 * i}}}"}) + "\n" for i in range(16)))
    return dict(model=str(model_dir), data=str(data), eval_rows=2, batch_size=3, micro_batch_tokens=96, steps=3,
                lr=1e-3, lr_schedule="constant", warmup_steps=0, save_every=1, keep_checkpoints=3, device="cpu")


def test_torchrun_sft_matches_one_process_with_ddp_or_fsdp_and_resumes_across_them(tiny_model_dir, tmp_path):
    from r1kit.config import SFTConfig
    from r1kit.sft.run import run_sft

    settings = sft_settings(tiny_model_dir, tmp_path)
    one = tmp_path / "one"
    run_sft(SFTConfig(**settings, out=str(one)))
    torchrun(*command("sft", SFTConfig(**settings, out=str(tmp_path / "two"))))
    rows = [[{k: v for k, v in json.loads(line).items() if not k.endswith(TIMING)}
             for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("one", "two")]
    assert len(rows[0]) == 5  # eval before, 3 steps, eval after
    assert_rows_close(rows[1], rows[0])
    assert_weights_close(tmp_path / "two" / "final", one / "final")
    # FSDP over 2 processes for 2 steps (its final/ a plain HF folder), then one process resumes it for the 3rd
    fsdp = SFTConfig(**{**settings, "steps": 2}, out=str(tmp_path / "fsdp"), parallel="fsdp")
    torchrun(*command("sft", fsdp))
    assert_rows_close(steps(tmp_path / "fsdp", "loss"), steps(one, "loss")[:2])
    assert_weights_close(tmp_path / "fsdp" / "final", one / "checkpoints" / "step-2")
    run_sft(fsdp.model_copy(update={"steps": 3, "resume": "latest", "parallel": "ddp"}))
    assert_rows_close(steps(tmp_path / "fsdp", "loss"), steps(one, "loss"))
    assert_weights_close(tmp_path / "fsdp" / "final", one / "final")
    # and FSDP resumes a one-process checkpoint
    resumed = fsdp.model_copy(update={"out": str(tmp_path / "resumed"), "steps": 3,
                                      "resume": str(one / "checkpoints" / "step-2")})
    torchrun(*command("sft", resumed))
    assert_rows_close(steps(tmp_path / "resumed", "loss"), steps(one, "loss")[2:])
    assert_weights_close(tmp_path / "resumed" / "final", one / "final")


def sharding_worker(model_dir: str, folder: str) -> None:
    """torchrun's worker: the shapes of one weight of a layer (its parameter, gradient and Adam state) on this rank,
    whole and local, in an FSDP SFT step of a model loaded in bf16, and whether sharding made it fp32 unchanged."""
    from r1kit import distributed
    from r1kit.config import SFTConfig
    from r1kit.models import load_model
    from r1kit.sft.data import load_examples
    from r1kit.sft.trainer import SFTTrainer

    cfg = SFTConfig(**sft_settings(model_dir, Path(folder)), parallel="fsdp")
    with distributed.launched("cpu"):
        model, tokenizer = load_model(model_dir, "cpu", "bfloat16")  # as a big checkpoint loads under FSDP
        loaded = {name: p.detach().float() for name, p in model.named_parameters()}
        trainer = SFTTrainer(cfg, model, tokenizer, load_examples(cfg.data, tokenizer, cfg.template, 256)[0])
        fp32 = {name: p.dtype == torch.float32 and torch.equal(p.full_tensor(), loaded[name])
                for name, p in model.named_parameters()}
        weight = model.model.layers[0].mlp.up_proj.weight
        seen = {}
        trainer.optimizer.register_step_pre_hook(lambda *_: seen.update(grad=weight.grad.to_local().shape))
        trainer.step()
        shapes = {"param": (weight.shape, weight.to_local().shape), "grad": seen["grad"],
                  "adam": trainer.optimizer.state[weight]["exp_avg"].to_local().shape, "fp32": fp32}
        torch.save(shapes, Path(folder) / f"shapes-{distributed.world().rank}.pt")


def test_fsdp_shards_parameters_gradients_and_adam_state_in_fp32_from_a_bf16_load(tiny_model_dir, tmp_path):
    sft_settings(tiny_model_dir, tmp_path)  # the traces, before the workers read them
    torchrun(__file__, "sharding_worker", str(tiny_model_dir), str(tmp_path))
    for rank in range(2):
        shapes = torch.load(tmp_path / f"shapes-{rank}.pt")
        assert shapes["param"] == ((128, 64), (64, 64))  # half of the rows on each rank
        assert shapes["grad"] == shapes["adam"] == (64, 64)
        # every parameter (the tied embedding and head included) fp32 master weights, equal to what was loaded
        assert len(shapes["fp32"]) == 20 and all(shapes["fp32"].values()), shapes["fp32"]


def test_fsdp_refuses_lora_and_an_eval_task_over_several_ranks(tiny_model_dir, tmp_path):
    from rich.console import Console

    from r1kit import distributed
    from r1kit.config import SFTConfig
    from r1kit.sft.run import sft

    settings = {**sft_settings(tiny_model_dir, tmp_path), "parallel": "fsdp", "out": str(tmp_path / "run")}
    with pytest.raises(ValueError, match="train LoRA with parallel=ddp"):
        SFTConfig(**settings, lora_r=4)
    with pytest.raises(ValueError, match="train LoRA with parallel=ddp"):  # and GRPO's
        base_config(tiny_model_dir, tmp_path, parallel="fsdp", lora_r=4)
    with pytest.raises(ValueError, match="eval_task does not run under parallel=fsdp on several processes"):
        sft(SFTConfig(**settings, eval_task="addition"), distributed.World(rank=0, size=2), "cpu", Console(quiet=True))
    assert not (tmp_path / "run").exists()


def test_prompts_per_step_must_split_over_the_ranks(tiny_model_dir, tmp_path, monkeypatch):
    from r1kit import distributed

    monkeypatch.setattr(distributed, "world", lambda: distributed.World(rank=0, size=2))
    with pytest.raises(ValueError, match="prompts_per_step=3 does not split over 2 processes"):
        make_trainer(base_config(tiny_model_dir, tmp_path, prompts_per_step=3))


def test_two_nodes_train_as_one_process(tiny_model_dir, tmp_path):
    from r1kit.rl.run import run_train

    one = base_config(tiny_model_dir, tmp_path, "one", prompts_per_step=2)
    run_train(one)
    torchrun(*command("train", base_config(tiny_model_dir, tmp_path, "two", prompts_per_step=2)), nodes=2)
    assert_rows_close(steps(tmp_path / "two"), steps(tmp_path / "one"))
    assert_weights_close(tmp_path / "two" / "final", tmp_path / "one" / "final")


def untimed(results: dict) -> dict:
    """An eval's results without what differs from run to run: times, the date and the output folder."""
    metrics = {k: v for k, v in results["metrics"].items() if k not in ("generation_s", "tokens_per_s")}
    config = {k: v for k, v in results["config"].items() if k != "out"}
    rest = {k: v for k, v in results.items() if k not in ("created", "wall_s", "timings", "metrics", "config")}
    return {**rest, "metrics": metrics, "config": config}


def test_eval_over_two_processes_writes_what_one_process_writes(tiny_model_dir, tmp_path):
    from r1kit.config import EvalConfig
    from r1kit.eval.harness import run_eval

    # chunks of 4 rows a process: 11 rows are a round of 4 + 4 rows, then one of 2 + 1
    settings = dict(model=str(tiny_model_dir), task="addition", limit=11, samples=3, batch_size=3,
                    max_new_tokens=8, temperature=1.0, device="cpu")
    run_eval(EvalConfig(**settings, out=str(tmp_path / "one")))
    run(*command("eval", EvalConfig(**settings, out=str(tmp_path / "two"))), "--nproc", "2")  # torchrun's 2
    one, two = tmp_path / "one", tmp_path / "two"
    expected, results = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert untimed(results) == untimed(expected) and results["metrics"]["problems"] == 11
    assert (two / "samples.jsonl").read_text() == (one / "samples.jsonl").read_text()
    summaries = [[line for line in (d / "summary.md").read_text().replace(r["created"], "").splitlines()
                  if "tokens/s" not in line and "wall time" not in line] for d, r in ((one, expected), (two, results))]
    assert summaries[0] == summaries[1]


def test_nproc_runs_the_command_line_under_torchrun():
    from r1kit.cli import torchrun_argv

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                "-m", "r1kit.cli"]
    assert torchrun_argv(["train", "--nproc", "4", "--config", "a.yaml", "steps=3"], 4) == [
        *launcher, "train", "--config", "a.yaml", "steps=3"]
    assert torchrun_argv(["eval", "--limit", "4", "--nproc=4"], 4) == [*launcher, "eval", "--limit", "4"]


def vowel_share(text: str, row: dict) -> float:
    """A held-out "accuracy" that a random model scores unevenly, so the figures compared are not all 0."""
    return sum(ch in "aeiou" for ch in text) / (1 + len(text))


def held_out(model_dir: str, world) -> dict[str, float]:
    """The tiny model's held-out figures on 5 addition rows (3 + 2 over 2 ranks), 3 samples a row."""
    from r1kit.eval.held_out import HeldOut, held_out_accuracy
    from r1kit.models import load_model
    from r1kit.rollout import make_generator
    from r1kit.tasks import load_task

    model, tokenizer = load_model(model_dir, "cpu", "float32")
    task = dataclasses.replace(load_task("addition").head(5), verify=vowel_share)
    held = HeldOut(task, "r1zero", max_tokens=8, samples=3, temperature=1.0, seed=3)
    return held_out_accuracy(model, make_generator(model, tokenizer, "hf", 4), tokenizer, held,
                             contextlib.nullcontext(), world=world)


def held_out_worker(model_dir: str, folder: str) -> None:
    """torchrun's worker: each rank's held-out figures, split over the ranks."""
    from r1kit import distributed

    with distributed.launched("cpu"):
        group = distributed.world()
        torch.save(held_out(model_dir, group), Path(folder) / f"held-{group.rank}.pt")


def test_held_out_accuracy_split_over_ranks_equals_one_process(tiny_model_dir, tmp_path):
    from r1kit import distributed

    expected = held_out(str(tiny_model_dir), distributed.world())
    assert expected["eval/sampled_accuracy"] > 0
    torchrun(__file__, "held_out_worker", str(tiny_model_dir), str(tmp_path))
    for rank in range(2):
        assert torch.load(tmp_path / f"held-{rank}.pt") == pytest.approx(expected, rel=1e-6)


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
