"""PTL: per-task VAEs locate the task of unlabelled samples from a frozen pre-MoE feature."""

import torch

from cmoe.config import LocatorConfig
from cmoe.model.locator import TaskLocator, drop_tokens, fit_task_vae, locator_features
from cmoe.model.routing import route_by_locator
from cmoe.model.surgery import decoder_layers

from .helpers import add_distinct_task, cmoe_model, make_batch

CFG = LocatorConfig(epochs=30, hidden=32, latent_dim=4)


def _gaussians(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unit Gaussian clusters in 16-D, means 6 sigma apart (Bayes error ~0.1 %)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g) + 0.75, torch.randn(n, 16, generator=g) - 0.75


def test_locator_separates_two_distributions() -> None:
    (a, b), (a_test, b_test) = _gaussians(256, 0), _gaussians(200, 1)
    locator = TaskLocator()
    locator.add_task("a", fit_task_vae(a, CFG, seed=0))
    locator.add_task("b", fit_task_vae(b, CFG, seed=1))
    pred = locator.predict(torch.cat([a_test, b_test]))
    truth = torch.tensor([0] * 200 + [1] * 200)
    assert (pred.index == truth).float().mean() >= 0.95
    assert pred.tasks == ["a", "b"] and pred.names == [("a", "b")[i] for i in pred.index.tolist()]
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(400))
    assert torch.equal(pred.probs.argmax(-1), pred.index)  # the located task is the most probable one
    # with two tasks the margin (best minus second-best probability) is |p_a - p_b|
    torch.testing.assert_close(pred.margin, (pred.probs[:, 0] - pred.probs[:, 1]).abs())
    # the batched pass over all VAEs equals evaluating each VAE alone
    x = torch.cat([a_test, b_test])
    alone = torch.stack([vae.errors(x) for vae in locator.vaes.values()], dim=1)
    torch.testing.assert_close(locator.errors(x), alone, atol=1e-5, rtol=1e-5)


def test_fit_is_seeded_and_leaves_the_global_rng_alone() -> None:
    a, _ = _gaussians(64, 0)
    state = torch.random.get_rng_state()
    v1, v2 = fit_task_vae(a, CFG, seed=3), fit_task_vae(a, CFG, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(v1.state_dict().values(), v2.state_dict().values()))


def test_features_come_from_before_the_decoder() -> None:
    model = cmoe_model()
    calls = []
    decoder_layers(model)[0].register_forward_hook(lambda *_: calls.append(1))
    batch = make_batch(batch=3)
    feats = locator_features(model, **batch)
    assert feats.shape == (3, 64) and not calls
    assert torch.equal(feats[:, 32:], model.get_input_embeddings()(batch["input_ids"][:, 5:]).mean(1))


def test_text_dropout_is_seeded_drops_about_p_and_leaves_the_image_half_alone() -> None:
    model = cmoe_model()
    batch = make_batch(batch=64)
    mask = batch["attention_mask"]
    dropped = drop_tokens(mask, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(dropped, drop_tokens(mask, 0.5, torch.Generator().manual_seed(0)))
    assert ((dropped == 0) | (mask == 1)).all()  # only ever removes positions
    assert 0.45 < dropped.sum() / mask.sum() < 0.55
    full = locator_features(model, batch["input_ids"], batch["pixel_values"], mask)
    part = locator_features(model, batch["input_ids"], batch["pixel_values"], dropped)
    assert torch.equal(full[:, :32], part[:, :32]) and not torch.equal(full[:, 32:], part[:, 32:])


def test_locator_routes_differently_styled_inputs_of_the_tiny_model() -> None:
    model = cmoe_model()
    add_distinct_task(model, "b")
    styles = {"a": {"low": 1, "high": 50, "brightness": 1.0}, "b": {"low": 50, "high": 100, "brightness": -1.0}}
    for t, (name, style) in enumerate(styles.items()):
        train = locator_features(model, **make_batch(batch=128, seed=t, **style))
        model.cmoe.locator.add_task(name, fit_task_vae(train, CFG, seed=t))
    correct = 0
    for t, (name, style) in enumerate(styles.items()):
        batch = make_batch(batch=50, seed=10 + t, **style)
        with route_by_locator(model, **batch) as pred:
            assert model.cmoe.routing.task_ids.tolist() == pred.index.tolist()
            correct += sum(n == name for n in pred.names)
    assert correct / 100 >= 0.95
