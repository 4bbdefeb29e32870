"""The chunked target log-probabilities against PyTorch's log_softmax, values and gradients."""

import pytest
import torch

from r1kit.rl import logprobs
from r1kit.rl.logprobs import target_logprobs


def reference(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    logp = (logits.float() / temperature).log_softmax(-1)
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("chunk", [2**20, 7 * 11, 5])  # whole batch, two sequences a chunk, pieces of one
def test_values_entropy_and_gradient_match_log_softmax(monkeypatch, chunk):
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 7, 11)).requires_grad_()
    targets = torch.randint(0, 11, (3, 7))
    weights = torch.randn(3, 7)

    picked, entropy = target_logprobs(logits, targets, temperature=0.7, with_entropy=True)
    (picked * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    expected, expected_entropy = reference(logits, targets, 0.7)
    (expected * weights).sum().backward()

    torch.testing.assert_close(picked, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, logits.grad, atol=1e-6, rtol=1e-5)
    assert not entropy.requires_grad


def test_hand_computed_two_token_vocabulary():
    # logits (0, ln 3): probabilities 1/4 and 3/4
    logits = torch.tensor([[[0.0, torch.log(torch.tensor(3.0)).item()]]], requires_grad=True)
    picked, entropy = target_logprobs(logits, torch.tensor([[1]]))
    picked.sum().backward()
    assert picked.item() == pytest.approx(torch.log(torch.tensor(0.75)).item(), abs=1e-6)
    assert entropy is None
    # d log p1 / d logits = onehot(1) - p = (-1/4, 1/4)
    torch.testing.assert_close(logits.grad, torch.tensor([[[-0.25, 0.25]]]))


def test_bf16_logits_get_a_bf16_gradient_and_float32_logprobs():
    logits = torch.randn(2, 3, 5, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 5, (2, 3))
    picked, _ = target_logprobs(logits, targets)
    picked.sum().backward()
    expected, _ = reference(logits.detach(), targets, 1.0)
    assert picked.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(picked, expected)


def test_a_sliced_view_of_the_logits_works_as_the_trainer_passes_it():
    torch.manual_seed(1)
    full = torch.randn(2, 5, 9, requires_grad=True)
    targets = torch.randint(0, 9, (2, 4))
    picked, _ = target_logprobs(full[:, :-1], targets)
    picked.sum().backward()
    expected, _ = reference(full[:, :-1].detach(), targets, 1.0)
    torch.testing.assert_close(picked, expected)
    assert full.grad[:, -1].abs().sum() == 0
