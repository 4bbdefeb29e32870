"""The GRPO loop on a tiny random model: mu > 1, NaN skip, failing rewards, exact resume, Ctrl-C, what it warns
about, time budgets, run folders."""

import json
import os
import signal
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import r1kit.rl.run as run_module
import r1kit.rl.trainer as trainer_module
from r1kit.config import TrainConfig
from r1kit.models import weights_sha256
from r1kit.rewards import build_rewards
from r1kit.rl.run import budget_steps, build_policy, build_tasks, run_train
from r1kit.rl.trainer import GRPOTrainer, step_list
from r1kit.rollout import make_generator

TIMING = ("_s", "tokens_per_s")

REWARD_FILE = '''
def vowels(completions, **kw):
    """Varies from sample to sample even for a random model, so every group carries signal."""
    return [sum(ch in "aeiou" for ch in c) / (1 + len(c)) for c in completions]

def flaky(completions, answer, **kw):
    return [1.0 if int(a) % 2 else 1 / 0 for a in answer]

def broken(completions, **kw):
    raise KeyError("no such column")

def constant(completions, **kw):
    return [1.0] * len(completions)
'''


@pytest.fixture()
def reward_file(tmp_path) -> Path:
    path = tmp_path / "toy_rewards.py"
    path.write_text(REWARD_FILE)
    return path


def config(tiny_model_dir, out, reward_file, **kw) -> TrainConfig:
    base = dict(model=str(tiny_model_dir), out=str(out), task="addition", group_size=4, prompts_per_step=2,
                max_completion_tokens=6, steps=3, eval_problems=4, lr=1e-3, device="cpu", save_every=1,
                rewards={f"{reward_file}:vowels": 1.0}, micro_batch_size=3)
    return TrainConfig(**{**base, **kw})


def make_trainer(cfg):
    train, _ = build_tasks(cfg)
    model, tokenizer, ref = build_policy(cfg, None)
    generator = make_generator(model, tokenizer, cfg.backend, cfg.batch_size)
    return GRPOTrainer(cfg, model, tokenizer, train, build_rewards(cfg.rewards, train.reward), generator, ref)


def test_held_out_rows_are_never_trained_on(tiny_model_dir, tmp_path, reward_file):
    cfg = config(tiny_model_dir, tmp_path, reward_file, task_args={"n": 3000}, eval_problems=256)
    train, held = build_tasks(cfg)
    assert len(held) == 256 and held.rows[0]["prompt"] == "What is 37 + 49? Put the final answer after 'Answer:'."
    assert not {r["prompt"] for r in train.rows} & {r["prompt"] for r in held.rows}


def test_mu_iterations_use_the_rollout_logprobs(tiny_model_dir, tmp_path, reward_file, monkeypatch):
    trainer = make_trainer(config(tiny_model_dir, tmp_path, reward_file, num_iterations=2, micro_batch_size=64))
    seen = []
    real = trainer_module.policy_loss

    def spy(logp, old_logp, *args, **kw):
        seen.append((logp.detach().clone(), old_logp.clone()))
        return real(logp, old_logp, *args, **kw)

    monkeypatch.setattr(trainer_module, "policy_loss", spy)
    metrics, batch = trainer.step()
    assert len(seen) == 2
    rollout = torch.tensor([c.logprobs + [0.0] * (6 - len(c.logprobs)) for c in batch.completions])
    assert torch.equal(seen[0][1], rollout) and torch.equal(seen[1][1], rollout)
    assert torch.allclose(seen[0][0], rollout, atol=1e-4)  # first pass: ratio 1 up to kernel noise
    assert not torch.allclose(seen[1][0], seen[0][0], atol=1e-4)  # second pass: the policy has moved
    assert metrics["skipped"] == 0.0 and metrics["step"] == 1


def test_nan_loss_skips_the_update(tiny_model_dir, tmp_path, reward_file, monkeypatch):
    trainer = make_trainer(config(tiny_model_dir, tmp_path, reward_file))
    before = [p.detach().clone() for p in trainer.params]
    monkeypatch.setattr(trainer_module, "policy_loss", lambda *a, **k: (torch.tensor(float("nan")), {}))
    with pytest.warns(RuntimeWarning, match=r"step 1: non-finite loss, update skipped: in micro-batch 1 of 3 "
                      r"\(sequences 1-3\)"):
        metrics, _ = trainer.step()
    assert metrics["skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))


def test_failing_reward_does_not_stop_training(tiny_model_dir, tmp_path, reward_file):
    cfg = config(tiny_model_dir, tmp_path / "run", reward_file, steps=2,
                 rewards={f"{reward_file}:vowels": 1.0, f"{reward_file}:flaky": 1.0})
    summary = run_train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert summary["steps"] == 2 and len(steps) == 2
    assert sum(r["reward_failures"] for r in steps) > 0
    assert "eval/greedy_accuracy" in rows[0] and "eval/greedy_accuracy" in rows[-1]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["model_sha256"] == weights_sha256(tiny_model_dir) and run["steps"] == 2
    assert set(run["before"]) == set(run["after"]) >= {"eval/greedy_accuracy", "eval/sampled_accuracy"}


def _cli(cfg_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "r1kit.cli", "train", "--config", str(cfg_path), *extra]


def _write(cfg: TrainConfig, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump()))
    return path


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "process ended"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _steps(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(TIMING)} for r in rows if "reward" in r]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, reward_file):
    steps = 12
    whole = config(tiny_model_dir, tmp_path / "whole", reward_file, steps=steps, eval_problems=0)
    subprocess.run(_cli(_write(whole, tmp_path / "whole.yaml")), check=True, capture_output=True)

    cut = config(tiny_model_dir, tmp_path / "cut", reward_file, steps=steps, eval_problems=0)
    cut_yaml = _write(cut, tmp_path / "cut.yaml")
    proc = subprocess.Popen(_cli(cut_yaml), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(tmp_path / "cut" / "checkpoints" / "step-3" / "trainer_state.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(_steps(tmp_path / "cut")) < steps
    subprocess.run(_cli(cut_yaml, "resume=latest"), check=True, capture_output=True)

    assert _steps(tmp_path / "cut") == _steps(tmp_path / "whole")
    a = load_file(tmp_path / "whole" / "checkpoints" / f"step-{steps}" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / f"step-{steps}" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_sigint_or_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_model_dir, tmp_path, reward_file, stop):
    cfg = config(tiny_model_dir, tmp_path / "run", reward_file, steps=100_000, eval_problems=0, save_every=1)
    proc = subprocess.Popen(_cli(_write(cfg, tmp_path / "run.yaml")), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "200"})
    _wait_for(tmp_path / "run" / "checkpoints" / "step-1" / "trainer_state.pt", proc)
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert "interrupted: saved" in err.decode() and "Traceback" not in err.decode()
    last = _steps(tmp_path / "run")[-1]["step"]
    assert (tmp_path / "run" / "checkpoints" / f"step-{last}" / "trainer_state.pt").is_file()


def test_nan_gradient_skips_the_update(tiny_model_dir, tmp_path, reward_file, monkeypatch):
    trainer = make_trainer(config(tiny_model_dir, tmp_path, reward_file))
    before = [p.detach().clone() for p in trainer.params]
    real = trainer_module.policy_loss

    def poisoned(logp, *args, **kw):
        loss, metrics = real(logp, *args, **kw)
        # finite value, NaN gradient: d sqrt(x)/dx at 0 is inf, and 0 * inf is NaN
        return loss + 0.0 * torch.sqrt(logp.sum() * 0.0), metrics

    monkeypatch.setattr(trainer_module, "policy_loss", poisoned)
    with pytest.warns(RuntimeWarning, match="step 1: non-finite gradient, update skipped"):
        metrics, _ = trainer.step()
    assert metrics["skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))


@pytest.mark.parametrize("every_pass", [True, False])
def test_a_skipped_update_names_its_non_finite_gradients(tiny_model_dir, tmp_path, reward_file, every_pass):
    trainer = make_trainer(config(tiny_model_dir, tmp_path, reward_file))  # 8 sequences, micro-batches of 3
    name = "model.layers.1.mlp.down_proj.weight"
    calls = []

    def poison(grad):  # the second micro-batch's gradient, in every pass over them or in the first only
        calls.append(grad)
        return grad * float("nan") if (len(calls) % 3 == 2 if every_pass else len(calls) == 2) else grad

    trainer.model.get_parameter(name).register_hook(poison)
    with pytest.warns(RuntimeWarning) as caught:
        metrics, _ = trainer.step()
    (message,) = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    if every_pass:
        assert message == (f"step 1: non-finite gradient, update skipped: in 1 of {len(trainer.params)} parameter "
                           f"tensors ({name}), first after micro-batch 2 of 3 (sequences 4-6)")
    else:  # a fault that does not come back when the micro-batches run again
        assert message.endswith("update skipped; not reproduced when its micro-batches ran again (a "
                                "nondeterministic kernel?)")
    assert metrics["skipped"] == 1.0 and len(calls) == 6  # the update's pass, and the search's
    assert all(p.grad is None for p in trainer.params)


def test_reward_warnings_show_the_first_of_each_kind(tiny_model_dir, tmp_path, reward_file):
    broken = f"{reward_file}:broken"
    trainer = make_trainer(config(tiny_model_dir, tmp_path, reward_file,
                                  rewards={f"{reward_file}:vowels": 1.0, broken: 1.0}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, _ = trainer.step()
        second, _ = trainer.step()
    assert [str(w.message) for w in caught if "raised" in str(w.message)] == [
        f"step 1: reward '{broken}' raised on 8 of 8 samples (first: KeyError: 'no such column'); scored 0.0 "
        "(the first of its kind; later ones are not shown)"]
    assert first["reward_failures"] == second["reward_failures"] == 8  # every one still counted


@pytest.mark.parametrize("dynamic", [True, False])
def test_steps_without_differing_rewards_are_reported(tiny_model_dir, tmp_path, reward_file, dynamic):
    trainer = make_trainer(config(tiny_model_dir, tmp_path, reward_file, rewards={f"{reward_file}:constant": 1.0},
                                  dynamic_sampling=dynamic, max_rollout_rounds=1, eval_problems=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps = [trainer.step()[0] for _ in range(4)]
    shown = [str(w.message) for w in caught if "the same reward" in str(w.message)]
    assert [m.split(":")[0] for m in shown] == ["step 1", "step 2", "step 4"]  # 1st, 2nd, 4th: not every step
    assert "(4 such steps so far: 1, 2, 3, 4). For rewards that differ within a group, raise " in shown[-1]
    assert shown[0].startswith("step 1: all 4 completions of each of the 2 prompts rolled out got the same reward, "
                               "so every advantage is 0: ")
    if dynamic:
        assert "0: update skipped (1 such step so far: 1)" in shown[0]
        assert "raise group_size, temperature or max_rollout_rounds, or add a reward" in shown[0]
        assert all(m["skipped"] == 1.0 for m in steps)
    else:
        assert "0: nothing to learn from it (1 such step so far: 1)" in shown[0]
        assert "raise group_size or temperature, or add a reward" in shown[0]
    assert step_list(list(range(1, 10))) == "1, 2, 3, ..., 7, 8, 9"


def test_report_plots_and_sample_pages(tiny_model_dir, tmp_path, reward_file):
    from r1kit.cli import main

    run = tmp_path / "run"
    run_train(config(tiny_model_dir, run, reward_file, steps=3, eval_every=2))
    assert main(["report", str(run)]) == 0
    page = (run / "report" / "index.md").read_text()
    assert "![curves](curves.png)" in page and "## Step 1" in page and "## Step 3" in page
    assert "| 0 |" in page and "| 2 |" in page  # held-out before, and at eval_every
    assert (run / "report" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(tmp_path)]) == 2  # no metrics.jsonl: a one-line error


def test_prompts_over_the_limit_are_skipped(tiny_model_dir, tmp_path, reward_file):
    with pytest.warns(RuntimeWarning, match="of 1000 training prompts are longer than max_prompt_tokens=66"):
        trainer = make_trainer(config(tiny_model_dir, tmp_path, reward_file, max_prompt_tokens=66, eval_problems=0))
    assert 0 < len(trainer.task.rows) < 1000
    assert all(len(trainer.generator.encode(p)) <= 66 for p in trainer.prompts)
    with pytest.raises(ValueError, match="no training prompt fits max_prompt_tokens=2"), pytest.warns(RuntimeWarning):
        make_trainer(config(tiny_model_dir, tmp_path, reward_file, max_prompt_tokens=2, eval_problems=0))


@pytest.mark.parametrize("lora_r", [0, 4])
def test_engine_and_hf_backends_train_alike(tiny_model_dir, tmp_path, reward_file, lora_r):
    runs = {}
    for backend in ("hf", "engine"):
        run_train(config(tiny_model_dir, tmp_path / backend, reward_file, steps=3, eval_problems=0, backend=backend,
                         lora_r=lora_r, lr=1e-2))
        runs[backend] = _steps(tmp_path / backend)
    for a, b in zip(runs["hf"], runs["engine"], strict=True):
        assert a["reward"] == b["reward"] and a["completion_length_mean"] == b["completion_length_mean"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_held_out_eval_sees_the_latest_update(tiny_model_dir, tmp_path, reward_file):
    from r1kit.rl.run import held_out_eval

    cfg = config(tiny_model_dir, tmp_path, reward_file, backend="engine", lora_r=4, lr=1e-2, eval_problems=4)
    trainer = make_trainer(cfg)
    trainer.step()  # the update after this step's rollout changes the adapters
    held_out_eval(trainer, build_tasks(cfg)[1], cfg)
    layer = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
    merged = layer.base_layer.weight + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A[
        "default"].weight
    engine_weight = trainer.generator.engine.decoder.w["model.layers.0.self_attn.q_proj.weight"]
    assert torch.allclose(engine_weight, merged, atol=1e-6)


def test_weights_refresh_once_per_update_and_are_timed(tiny_model_dir, tmp_path, reward_file, monkeypatch):
    # dynamic sampling rolls out several rounds a step: the generator's buffers are refreshed before the first
    # only (no update comes between rounds), and the refresh's time is reported as sync_s
    cfg = config(tiny_model_dir, tmp_path, reward_file, backend="engine", lora_r=4, dynamic_sampling=True,
                 max_rollout_rounds=3, eval_problems=0)
    trainer = make_trainer(cfg)
    refreshes, real = [], trainer.generator.sync_weights
    monkeypatch.setattr(trainer.generator, "sync_weights", lambda: refreshes.append(trainer.step_count) or real())
    monkeypatch.setattr(trainer_module, "informative_groups", lambda rewards, g: torch.zeros(len(rewards) // g,
                                                                                           dtype=torch.bool))
    first, _ = trainer.step()  # no group informative: every round runs
    second, _ = trainer.step()
    assert first["groups_generated"] == 3 * cfg.prompts_per_step and refreshes == [0, 1]
    assert 0 < first["sync_s"] <= first["generation_s"] and second["sync_s"] > 0


def test_bad_model_or_data_fails_before_the_run_folder_exists(tiny_model_dir, tmp_path, reward_file):
    from r1kit.models import ModelError
    from r1kit.tasks import DataError

    out = tmp_path / "run"
    with pytest.raises(ModelError, match=f"^'{tmp_path / 'nope'}' is not a model: give 'default', a .gguf file"):
        run_train(config(tiny_model_dir, out, reward_file, model=str(tmp_path / "nope")))
    assert not out.exists()
    with pytest.raises(DataError, match=f"^{tmp_path / 'missing.jsonl'}: no such file$"):
        run_train(config(tiny_model_dir, out, reward_file, task="jsonl", data=str(tmp_path / "missing.jsonl")))
    assert not out.exists()


def test_budget_steps_counts_the_steps_that_fit():
    cfg = TrainConfig(steps=100, time_budget_s=10)
    assert budget_steps(cfg, 1, 4.0, 4.0) == 3  # 6 s left: steps that end at 8 s and 12 s (past it: the last)
    assert budget_steps(cfg, 2, 4.0, 2.0) == 5
    assert budget_steps(cfg, 5, 11.0, 2.0) == 5
    assert budget_steps(cfg.model_copy(update={"steps": 3}), 1, 1.0, 1.0) == 3


def test_a_time_budget_is_planned_by_the_measured_speed(tiny_model_dir, tmp_path, reward_file, monkeypatch, capsys):
    clock, real = [0.0], GRPOTrainer.step

    def slow(self):  # a busy machine: 2 s a step on the run's clock
        clock[0] += 2.0
        return real(self)

    monkeypatch.setattr(run_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(GRPOTrainer, "step", slow)
    summary = run_train(config(tiny_model_dir, tmp_path / "run", reward_file, steps=100, eval_problems=0,
                               save_every=0, time_budget_s=7))
    err = " ".join(capsys.readouterr().err.split())
    # 5 s left after the first step: steps ending at 4, 6 and 8 s, the last past the budget
    assert ("step 1 took 2.0 s: time_budget_s=7 fits about 4 steps; too few to learn much; give it "
            "time_budget_s=20 or more, or run it where the CPU is free or on a GPU") in err
    assert summary["steps"] == 4 and "time_budget_s=7 allowed 4 steps (2 s a step)" in err


def test_a_time_budget_that_allows_too_few_steps_is_reported(tiny_model_dir, tmp_path, reward_file, capsys):
    run_train(config(tiny_model_dir, tmp_path / "run", reward_file, steps=5, eval_problems=0, time_budget_s=1e-6))
    err = " ".join(capsys.readouterr().err.split())
    assert "time_budget_s=1e-06 allowed 1 step (" in err and "too few to learn much" in err


def test_a_new_run_sets_an_earlier_one_aside_and_resume_continues_it(tiny_model_dir, tmp_path, reward_file, capsys,
                                                                     monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # rich would break the long paths
    out = tmp_path / "run"
    run_train(config(tiny_model_dir, out, reward_file, steps=1, eval_problems=0))
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    run_train(config(tiny_model_dir, out, reward_file, steps=1, eval_problems=0))
    (aside,) = tmp_path.glob("run.old-*")
    assert f"{out} held an earlier run: moved it to {aside} (resume=latest continues a run instead)" in (
        capsys.readouterr().err)
    for run in (out, aside):  # each run its own checkpoint and TensorBoard events
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-1"]
        assert len(list((run / "tensorboard").iterdir())) == 1 and (run / "run.json").is_file()
    assert (out / "notes.txt").read_text() == "mine"  # not the run's: it stays

    run_train(config(tiny_model_dir, out, reward_file, steps=2, eval_problems=0, resume="latest"))
    assert "earlier run" not in capsys.readouterr().err and len(list(tmp_path.glob("run.old-*"))) == 1
    assert [r["step"] for r in _steps(out)] == [1, 2]


def test_a_lone_config_is_no_run_to_set_aside(tmp_path):
    from r1kit.rl.runlog import set_aside

    (tmp_path / "config.yaml").write_text("steps: 1\n")
    assert set_aside(tmp_path) is None and (tmp_path / "config.yaml").is_file()


def test_update_batch_gives_each_completion_the_logprobs_it_has_alone(tiny_model_dir):
    # prompts and completions of different lengths in one right-padded batch, no attention mask: every
    # completion token's log-probability (and entropy) is the one its sequence gets with no padding at all
    from transformers import AutoModelForCausalLM

    from r1kit.rl.trainer import pad_sequences, token_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15]]
    completions = [[20, 21, 22, 23], [30], [40, 41]]
    batch = pad_sequences(prompts, completions, pad_id=0, device=torch.device("cpu"))
    assert "attention_mask" not in batch
    with torch.no_grad():
        logp, entropy = token_logprobs(model, batch, slice(1, 3), temperature=0.7, with_entropy=True)
        alone = []
        for p, c in zip(prompts[1:], completions[1:], strict=True):
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1] / 0.7
            alone.append((logits.log_softmax(-1), torch.tensor(c)))
    for i, (log_probs, c) in enumerate(alone):
        n = len(c)
        torch.testing.assert_close(logp[i, :n], log_probs.gather(1, c[:, None])[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy[i, :n], -(log_probs.exp() * log_probs).sum(-1), atol=1e-4, rtol=1e-4)
    assert batch["mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
