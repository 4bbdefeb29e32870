"""GRPO learns: a tiny random model's reward rises on a task any policy can learn, and falls when the advantage's
sign is flipped, through the real trainer (HF rollout, rewards, advantages, loss, AdamW)."""

import pytest
import torch

import r1kit.rl.trainer as trainer_module
from r1kit.config import TrainConfig
from r1kit.rl.run import build_policy, build_tasks
from r1kit.rl.trainer import GRPOTrainer
from r1kit.rollout import make_generator

STEPS = 20


def even_tokens(completions, completion_ids, **kw):
    """The share of a completion's tokens whose id is even: about 0.5 for a random model, 1.0 when it has learned
    to pick even ids, whatever the prompt."""
    return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def rewards_over_training(model_dir, out) -> list[float]:
    """Each step's mean reward over STEPS steps of GRPO on even_tokens."""
    cfg = TrainConfig(model=str(model_dir), out=str(out), task="addition", task_args={"n": 200}, group_size=8,
                      prompts_per_step=4, max_completion_tokens=4, steps=STEPS, eval_problems=0, lr=3e-2,
                      device="cpu", backend="hf", micro_batch_size=32, rewards={})
    torch.manual_seed(cfg.seed)
    train, _ = build_tasks(cfg)
    model, tokenizer, ref = build_policy(cfg, None)
    generator = make_generator(model, tokenizer, cfg.backend, cfg.batch_size)
    trainer = GRPOTrainer(cfg, model, tokenizer, train, {"even": (even_tokens, 1.0)}, generator, ref)
    return [trainer.step()[0]["reward"] for _ in range(STEPS)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.fixture()
def one_thread():
    """Tiny matrices gain nothing from a second thread, and on a busy 2-core machine two threads waiting for each
    other made this test six times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# once every completion earns the same reward the trainer says there is nothing left to learn: expected here
@pytest.mark.filterwarnings("ignore:step .* got the same reward:RuntimeWarning")
def test_reward_rises_and_falls_with_the_advantage_sign_flipped(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    learned = rewards_over_training(tiny_model_dir, tmp_path / "learn")
    assert mean(learned[:5]) < 0.6 and mean(learned[-5:]) > 0.9, learned

    real = trainer_module.group_advantages
    monkeypatch.setattr(trainer_module, "group_advantages", lambda *a, **k: -real(*a, **k))
    unlearned = rewards_over_training(tiny_model_dir, tmp_path / "flipped")
    assert unlearned[0] == learned[0]  # the same first rollout: only the update's direction differs
    assert mean(unlearned[-5:]) < 0.2, unlearned
