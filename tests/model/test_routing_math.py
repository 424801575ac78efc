"""Top-k gates and the load-balancing loss on hand-made router logits."""

import math

import torch

from cmoe.model.cmoe_layer import load_balancing_loss, topk_route


def test_topk_renormalises_the_chosen_gates() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.0625, 0.375, 0.0625]]))
    gates, idx, probs = topk_route(logits, k=2)
    torch.testing.assert_close(probs, logits.exp())
    assert idx.tolist() == [[3, 2], [0, 2]]
    torch.testing.assert_close(gates, torch.tensor([[4 / 7, 3 / 7], [0.5 / 0.875, 0.375 / 0.875]]))


def test_masked_experts_are_never_chosen() -> None:
    logits = torch.tensor([[5.0, 0.0, float("-inf")]])
    gates, idx, probs = topk_route(logits, k=2)
    assert idx.tolist() == [[0, 1]] and probs[0, 2] == 0
    assert math.isclose(float(gates.sum()), 1.0, rel_tol=1e-6)


def test_load_balancing_loss_by_hand() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3]])
    idx = probs.topk(2, dim=-1).indices
    # top-1 fractions (2/4, 1/4, 1/4); mean probs (0.4, 0.275, 0.325)
    expected = 3 * (0.4 * 0.5 + 0.275 * 0.25 + 0.325 * 0.25)
    assert math.isclose(float(load_balancing_loss(probs, idx)), expected, rel_tol=1e-6)
    uniform = torch.full((4, 4), 0.25)
    balanced_idx = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]])
    assert math.isclose(float(load_balancing_loss(uniform, balanced_idx)), 1.0, rel_tol=1e-6)  # its minimum
