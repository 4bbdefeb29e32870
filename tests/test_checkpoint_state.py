"""trainer_state.pt holds only what a weights-only load accepts: a checkpoint from elsewhere cannot run code."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from r1kit.config import TrainConfig
from r1kit.rewards import build_rewards
from r1kit.rl.checkpoint import STATE_FILE, load_state, plain, resume_run, save_checkpoint, set_rng_state
from r1kit.rl.run import build_policy, build_tasks, run_train
from r1kit.rl.trainer import GRPOTrainer
from r1kit.rollout import make_generator

REWARD_FILE = '''
def vowels(completions, **kw):
    return [sum(ch in "aeiou" for ch in c) / (1 + len(c)) for c in completions]
'''


class NoWeights:
    """Stands for a model and a tokenizer where only the trainer state matters."""

    def save_pretrained(self, folder: Path) -> None:
        pass


class Payload:
    """Unpickled, it would create `marker`: what a hostile checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def draws() -> tuple:
    return random.random(), torch.rand(3).tolist(), np.random.rand(3).tolist()


def test_a_real_runs_state_loads_weights_only_and_resumes_into_a_new_trainer(tiny_model_dir, tmp_path):
    rewards = tmp_path / "toy_rewards.py"
    rewards.write_text(REWARD_FILE)
    cfg = TrainConfig(model=str(tiny_model_dir), out=str(tmp_path / "run"), task="addition", group_size=4,
                      prompts_per_step=2, max_completion_tokens=6, steps=2, eval_problems=2, lr=1e-3, device="cpu",
                      rewards={f"{rewards}:vowels": 1.0})
    run_train(cfg)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-2"
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert {"optimizer", "scheduler", "stream", "step_count", "summary", "rng", "step"} <= set(state)
    assert state["optimizer"]["state"] and "after" in state["summary"]
    assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)

    train, _ = build_tasks(cfg)
    model, tokenizer, ref = build_policy(cfg, checkpoint)
    trainer = GRPOTrainer(cfg, model, tokenizer, train, build_rewards(cfg.rewards, train.reward),
                          make_generator(model, tokenizer, cfg.backend, cfg.batch_size), ref)
    resume_run(checkpoint, trainer, summary := {})
    assert trainer.step_count == 2 and trainer.stream.state_dict() == state["stream"]
    assert trainer.scheduler.state_dict() == state["scheduler"]
    resumed = trainer.optimizer.state_dict()["state"]
    assert resumed.keys() == state["optimizer"]["state"].keys()
    for key, saved in state["optimizer"]["state"].items():
        assert all(torch.equal(resumed[key][name], value) for name, value in saved.items())
    assert summary["before"] == state["summary"]["before"]


def test_every_rng_comes_back_after_a_weights_only_load(tmp_path):
    random.seed(1), torch.manual_seed(1), np.random.seed(1)
    np.random.randn()  # numpy keeps a cached gaussian in its state
    folder = save_checkpoint(tmp_path, 1, NoWeights(), NoWeights(), {})
    expected = draws()
    random.seed(2), torch.manual_seed(2), np.random.seed(2)
    set_rng_state(load_state(folder)["rng"])
    assert draws() == expected


def test_numpy_numbers_are_saved_as_numbers_and_other_objects_are_refused_at_save(tmp_path):
    folder = save_checkpoint(tmp_path, 1, NoWeights(), NoWeights(), {"summary": {"acc": np.float64(0.5)}})
    assert type(load_state(folder)["summary"]["acc"]) is float
    with pytest.raises(TypeError, match=r"trainer state\['summary'\]\['when'\] is a pathlib\.PosixPath"):
        plain({"summary": {"when": Path("/")}})


def test_a_checkpoint_with_a_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    checkpoint = tmp_path / "step-1"
    checkpoint.mkdir()
    torch.save({"step": 1, "summary": {"x": Payload(marker)}}, checkpoint / STATE_FILE)
    with pytest.raises(ValueError, match=f"resume: {checkpoint / STATE_FILE} holds a reference to .*open; .*refused"):
        resume_run(checkpoint, None, {})
    assert not marker.exists()


def test_a_stop_signalled_twice_at_once_checkpoints_and_a_later_second_one_aborts():
    """GNU timeout signals the child and then its process group: one stop, delivered twice."""
    import os
    import signal

    from r1kit.rl.checkpoint import StopRequest

    now = [100.0]
    stop = StopRequest(clock=lambda: now[0])
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the same instant: the process group's copy
        assert stop.requested
        now[0] += StopRequest.REPEAT_S
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C, a second later
    finally:
        stop.restore()
