"""GRPO pieces against values worked out by hand (see the comments for each number)."""

import math

import pytest
import torch

from r1kit.rl.advantages import group_advantages, informative_groups
from r1kit.rl.loss import policy_loss

# Two sequences of 3 tokens; the last token of the second is padding.
LOGP = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]])
OLD = torch.tensor([[-1.3, -0.5, -1.5], [-0.3, -0.9, -0.9]])
ADV = torch.tensor([1.0, -2.0])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
# ratios: seq 0: e^0.3 = 1.3499 (above 1 + 0.28: clipped to 1.28), 1, e^-0.5 = 0.6065 (A > 0: min keeps 0.6065)
#         seq 1: 1, e^-0.3 = 0.7408 (below 1 - 0.2 with A < 0: clipped to 0.8), masked
# per-token loss -min(r A, clip(r) A): seq 0: -1.28, -1, -e^-0.5; seq 1: 2, 1.6, (masked)
SEQ0 = [-1.28, -1.0, -math.exp(-0.5)]
SEQ1 = [2.0, 1.6]


def loss(**kw):
    return policy_loss(LOGP, OLD, ADV, MASK, clip_low=0.2, clip_high=0.28, **kw)


def test_grpo_token_mean_per_sequence_then_mean():
    value, metrics = loss(loss_type="grpo")
    assert value.item() == pytest.approx((sum(SEQ0) / 3 + sum(SEQ1) / 2) / 2, abs=1e-6)
    assert metrics["clip_fraction"] == pytest.approx(2 / 5)
    assert metrics["clip_low_fraction"] == pytest.approx(1 / 5)
    assert metrics["clip_high_fraction"] == pytest.approx(1 / 5)


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo"])
def test_bnpo_and_dapo_mean_over_all_tokens(loss_type):
    assert loss(loss_type=loss_type)[0].item() == pytest.approx((sum(SEQ0) + sum(SEQ1)) / 5, abs=1e-6)


def test_dr_grpo_divides_by_batch_times_max_length():
    value = loss(loss_type="dr_grpo", max_completion_length=4)[0]
    assert value.item() == pytest.approx((sum(SEQ0) + sum(SEQ1)) / (2 * 4), abs=1e-6)
    assert loss(loss_type="dr_grpo")[0].item() == pytest.approx((sum(SEQ0) + sum(SEQ1)) / (2 * 3), abs=1e-6)


def test_k3_kl_with_beta():
    ref = torch.tensor([[-1.1, -0.5, -2.0], [-0.5, -1.2, -0.7]])
    # delta = ref - logp: -0.1 and -0.2 on the first tokens, 0 elsewhere; k3 = e^d - d - 1
    k01, k02 = math.exp(-0.1) + 0.1 - 1, math.exp(-0.2) + 0.2 - 1
    value, metrics = loss(loss_type="grpo", ref_logp=ref, beta=0.1)
    seq0 = (sum(SEQ0) + 0.1 * k01) / 3
    seq1 = (sum(SEQ1) + 0.1 * k02) / 2
    assert value.item() == pytest.approx((seq0 + seq1) / 2, abs=1e-6)
    assert metrics["kl"] == pytest.approx((k01 + k02) / 5, abs=1e-7)
    with pytest.raises(ValueError, match="beta > 0 needs ref_logp"):
        loss(beta=0.1)


def test_masked_tokens_do_not_count():
    changed = LOGP.clone()
    changed[1, 2] = 5.0  # only the padding token moves
    assert policy_loss(changed, OLD, ADV, MASK)[0].item() == pytest.approx(policy_loss(LOGP, OLD, ADV, MASK)[0].item())


def test_normalizer_makes_micro_batches_add_up():
    whole = loss(loss_type="bnpo")[0]
    parts = [policy_loss(LOGP[i : i + 1], OLD[i : i + 1], ADV[i : i + 1], MASK[i : i + 1], clip_low=0.2,
                         clip_high=0.28, loss_type="bnpo", normalizer=5.0)[0] for i in range(2)]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), abs=1e-6)


def test_gradient_at_ratio_one_is_the_advantage():
    logp = OLD.clone().requires_grad_(True)
    policy_loss(logp, OLD, ADV, MASK, loss_type="bnpo")[0].backward()
    assert torch.allclose(logp.grad, -ADV[:, None] * MASK / 5)


def test_a_huge_ratio_on_a_clipped_token_keeps_the_gradient_finite():
    # logp - old = 100: exp overflows in float32. With A > 0 the clipped term is chosen (loss -1.28 A, finite),
    # yet an unbounded exp sent 0 * inf = NaN back through the other branch: the "non-finite gradient,
    # update skipped" of GRPO runs. Bounded, the token is clipped as it should be: no gradient from it.
    old = torch.tensor([[-101.0, -1.0]])
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    value, _ = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), clip_high=0.28, loss_type="bnpo")
    value.backward()
    assert value.item() == pytest.approx((-1.28 - 1.0) / 2)
    assert logp.grad.tolist() == [[0.0, -0.5]]
    unbounded = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    ratio = torch.exp(unbounded - old)  # what the loss did before
    (-torch.min(ratio * 1.0, ratio.clamp(0.8, 1.28) * 1.0)).mean().backward()
    assert torch.isnan(unbounded.grad[0, 0])


def test_entropy_metric_is_masked_mean():
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    assert loss(entropy=entropy)[1]["entropy"] == pytest.approx(15 / 5)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 0: mean 0.5, unbiased std sqrt(1/3); group 1: all equal
    std0 = math.sqrt(1 / 3)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std0 + 1e-4)
    adv = group_advantages(rewards, 4, "group")
    assert torch.allclose(adv[:4], expected, atol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))  # equal rewards: zero advantage
    batch_std = rewards.std().item()
    assert torch.allclose(group_advantages(rewards, 4, "batch")[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) /
                          (batch_std + 1e-4), atol=1e-6)
    assert torch.equal(group_advantages(rewards, 4, "none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    assert informative_groups(rewards, 4).tolist() == [True, False]
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        group_advantages(rewards, 3)
