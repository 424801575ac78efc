"""Parameter accounting: total = dense base + upcycled copies + what each task added."""

from cmoe.config import LocatorConfig
from cmoe.model.cmoe_layer import add_expert
from cmoe.model.locator import fit_task_vae
from cmoe.model.params import count_params

import torch

from .helpers import add_distinct_task, cmoe_model, tiny_llava

EXPERT = 3 * 32 * 64  # gate, up, down of a 32 -> 64 gated MLP, no bias


def test_counts_add_up() -> None:
    dense = sum(p.numel() for p in tiny_llava().parameters())
    model = cmoe_model()
    add_expert(model, 2, "random")
    add_distinct_task(model, "b")
    model.cmoe.locator.add_task("b", fit_task_vae(torch.randn(16, 64), LocatorConfig(epochs=1, hidden=8, latent_dim=2)))
    c = count_params(model)
    vae = sum(p.numel() for p in model.cmoe.locator.vaes["b"].parameters())
    assert c.dense_base == dense
    assert c.upcycled == 2 * 3 * EXPERT
    assert c.added_per_task == {"a": EXPERT + 4 * 32 + 5 * 32, "b": 2 * EXPERT + 5 * 32 + 6 * 32 + vae}
    assert c.total == c.dense_base + c.upcycled + sum(c.added_per_task.values())
    # every token: the non-MoE base, top-2 experts and the current router in each CMoE layer
    assert c.active_per_token == dense - 2 * EXPERT + 2 * (2 * EXPERT) + 5 * 32 + 6 * 32
