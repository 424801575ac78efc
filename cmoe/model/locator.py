"""PTL, the probabilistic task locator: one small VAE per task picks the router of an unlabelled input.

Design decisions (docs/method.md, choices 9-11 and 14):

- Input: a frozen, task-agnostic, per-sample feature computed *before* the first CMoE layer, so it
  never changes when experts are added: mean-pooled projected image tokens ⊕ mean-pooled
  embeddings of the prompt's text tokens (`locator_features`), from the model's own vision side
  and embeddings whatever its family.
- Each task's VAE sees the feature standardised with *that task's* training mean/std, and is fit
  on that task's training data only: MLP encoder/decoder (SiLU), Gaussian latent, loss =
  per-feature MSE + beta * per-latent-dim KL, beta warmed up linearly over the first 30 % of steps.
- The reconstruction error (MSE of the decoded posterior mean: deterministic at inference) is
  z-scored against the task's own training errors, since VAEs of different tasks reconstruct at
  different scales. argmin z = the located task; softmax(-z / T) = probabilities; margin = best
  minus second-best probability (1.0 with a single task), for alerting on unsure routing.
- At inference all task VAEs run in one batched pass (weights stacked, `baddbmm`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cmoe.config import LocatorConfig
from cmoe.model.families import family

WARMUP_FRACTION = 0.3  # of training steps over which beta ramps from 0 to cfg.beta
_EPS = 1e-6  # floor for standard deviations (constant features, perfectly reconstructed tasks)


@torch.no_grad()
def locator_features(
    model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None, **image_inputs: torch.Tensor,
) -> torch.Tensor:
    """Per-sample (B, 2d) feature of a batch: mean projected image tokens ⊕ mean text embeddings.

    Uses only the vision side (tower and projector) and the input embeddings (all frozen), never
    the decoder: the feature is the same before and after any expansion. `image_inputs` are the
    family's other image inputs beside `pixel_values` (LLaVA-NeXT's image_sizes, Qwen2-VL's
    image_grid_thw, ...; any other batch key is ignored). One image per sample; a batch without
    images gets zeros for the image half. Image and padding tokens are left out of the text mean.
    """
    text_mean = text_features(model, input_ids, attention_mask)
    if pixel_values is None:
        return torch.cat([torch.zeros_like(text_mean), text_mean], dim=-1)
    return torch.cat([image_features(model, {"input_ids": input_ids, "pixel_values": pixel_values, **image_inputs}),
                      text_mean], dim=-1)


@torch.no_grad()
def text_features(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The text half (B, d): mean input embedding of the prompt's text tokens (not image, not padding)."""
    text = model.get_input_embeddings()(input_ids)
    keep = input_ids != model.config.image_token_id
    if attention_mask is not None:
        keep &= attention_mask.bool()
    w = keep.unsqueeze(-1).to(text.dtype)
    return ((text * w).sum(1) / w.sum(1).clamp_min(1.0)).float()


@torch.no_grad()
def image_features(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The image half (B, d): mean of each sample's projected image tokens (the vision side only).

    `batch` holds input_ids and the family's image inputs. Every family's `get_image_features`
    returns the projected tokens in the order the prompts' image tokens take them, so each sample's
    share is as many of them as its prompt has image tokens.
    """
    keys = family(model.config.model_type).image_inputs
    inputs = {k: v for k, v in batch.items() if k in keys}
    pooled = model.model.get_image_features(**inputs, return_dict=True).pooler_output
    tokens = torch.cat(list(pooled)) if isinstance(pooled, (list, tuple)) else pooled
    counts = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    return torch.stack([f.mean(0) for f in tokens.split(counts)]).float()


def drop_tokens(attention_mask: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """`attention_mask` with every position dropped with probability `p` (draws on the CPU `generator`).

    Fed to `locator_features`, it drops text tokens from the text mean (image features do not read
    the mask): the augmentation that makes the locator robust to re-worded questions.
    """
    keep = torch.rand(attention_mask.shape, generator=generator) >= p
    return attention_mask * keep.to(attention_mask.device, attention_mask.dtype)


class TaskVAE(nn.Module):
    """One task's VAE plus its feature standardisation and training reconstruction-error statistics."""

    def __init__(self, n_features: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.latent = latent
        self.enc = nn.Linear(n_features, hidden)
        self.enc_out = nn.Linear(hidden, 2 * latent)  # mean and log-variance
        self.dec = nn.Linear(latent, hidden)
        self.dec_out = nn.Linear(hidden, n_features)
        self.register_buffer("feat_mean", torch.zeros(n_features))
        self.register_buffer("feat_std", torch.ones(n_features))
        self.register_buffer("err_mean", torch.zeros(()))
        self.register_buffer("err_std", torch.ones(()))

    def forward(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Standardised features -> (reconstruction from a sampled latent, mu, logvar)."""
        mu, logvar = self.enc_out(F.silu(self.enc(xs))).chunk(2, dim=-1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.dec_out(F.silu(self.dec(z))), mu, logvar

    @torch.no_grad()
    def errors(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample reconstruction MSE of raw features (B, F) through the posterior mean."""
        xs = (x - self.feat_mean) / self.feat_std
        mu = self.enc_out(F.silu(self.enc(xs)))[:, : self.latent]
        return (self.dec_out(F.silu(self.dec(mu))) - xs).pow(2).mean(-1)


def fit_task_vae(features: torch.Tensor, cfg: LocatorConfig | None = None, seed: int = 0, batch_size: int = 64) -> TaskVAE:
    """Fit one task's VAE on its training features (N, F) only, then record its error statistics."""
    cfg = cfg or LocatorConfig()
    x = features.float()
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"locator features must be (N >= 2, F), got {tuple(x.shape)}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded init and sampling without touching the global RNG
        torch.manual_seed(seed)
        vae = TaskVAE(x.shape[1], cfg.hidden, cfg.latent_dim)
        vae.feat_mean.copy_(x.mean(0))
        vae.feat_std.copy_(x.std(0).clamp_min(_EPS))
        xs = (x - vae.feat_mean) / vae.feat_std
        opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
        steps_per_epoch = -(-len(xs) // batch_size)
        warmup = max(1, int(WARMUP_FRACTION * cfg.epochs * steps_per_epoch))
        step = 0
        for _ in range(cfg.epochs):
            for rows in torch.randperm(len(xs), generator=gen).split(batch_size):
                recon, mu, logvar = vae(xs[rows])
                kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).mean()
                loss = F.mse_loss(recon, xs[rows]) + cfg.beta * min(1.0, step / warmup) * kl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    vae.requires_grad_(False).eval()
    err = vae.errors(x)
    vae.err_mean.copy_(err.mean())
    vae.err_std.copy_(err.std().clamp_min(_EPS))
    return vae


@dataclass(frozen=True)
class LocatorPrediction:
    """The located task of every sample, with the evidence for it."""

    tasks: list[str]  # the locator's task order: columns of `probs` and `z`
    index: torch.Tensor  # (B,) located task, an index into `tasks`
    probs: torch.Tensor  # (B, T) softmax(-z / temperature)
    margin: torch.Tensor  # (B,) best minus second-best probability
    z: torch.Tensor  # (B, T) z-scored reconstruction errors

    @property
    def names(self) -> list[str]:
        """The located task name of every sample."""
        return [self.tasks[i] for i in self.index.tolist()]


class TaskLocator(nn.Module):
    """The bank of task VAEs; `predict` evaluates all of them in one batched pass."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.vaes = nn.ModuleDict()

    @property
    def tasks(self) -> list[str]:
        """Task names in the order their VAEs were added."""
        return list(self.vaes.keys())

    def add_task(self, name: str, vae: TaskVAE) -> None:
        """Register task `name`'s fitted VAE; all VAEs must share a shape so they can be batched."""
        if name in self.vaes:
            raise ValueError(f"locator already has a VAE for task {name!r}")
        if self.vaes:
            first = next(iter(self.vaes.values()))
            shapes = [tuple(p.shape) for p in first.state_dict().values()]
            if shapes != [tuple(p.shape) for p in vae.state_dict().values()]:
                raise ValueError(f"task {name!r}: VAE shape differs from the locator's other VAEs")
        self.vaes[name] = vae

    @torch.no_grad()
    def errors(self, features: torch.Tensor) -> torch.Tensor:
        """Reconstruction MSE (B, T) of every sample under every task's VAE, batched over tasks."""
        if not self.vaes:
            raise RuntimeError("the locator has no task VAEs yet")
        vaes = list(self.vaes.values())

        # (T, in, out) weights and (T, 1, out) biases: one baddbmm runs a layer of every VAE
        stacked = {
            name: (torch.stack([getattr(v, name).weight.mT for v in vaes]),
                   torch.stack([getattr(v, name).bias for v in vaes]).unsqueeze(1))
            for name in ("enc", "enc_out", "dec", "dec_out")
        }

        def linear(name: str, x: torch.Tensor) -> torch.Tensor:
            weight, bias = stacked[name]
            return torch.baddbmm(bias, x, weight)

        mean = torch.stack([v.feat_mean for v in vaes]).unsqueeze(1)  # (T, 1, F)
        std = torch.stack([v.feat_std for v in vaes]).unsqueeze(1)
        xs = (features.float().unsqueeze(0) - mean) / std  # (T, B, F): each task's own standardisation
        mu = linear("enc_out", F.silu(linear("enc", xs)))[..., : vaes[0].latent]
        recon = linear("dec_out", F.silu(linear("dec", mu)))
        return (recon - xs).pow(2).mean(-1).T

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> LocatorPrediction:
        """Locate the task of every sample (B, F): z-scored errors, argmin, probabilities, margin."""
        vaes = list(self.vaes.values())
        err_mean = torch.stack([v.err_mean for v in vaes])
        err_std = torch.stack([v.err_std for v in vaes])
        z = (self.errors(features) - err_mean) / err_std
        probs = (-z / self.temperature).softmax(-1)
        top = probs.topk(min(2, probs.shape[1]), dim=-1).values
        margin = top[:, 0] - top[:, 1] if top.shape[1] > 1 else torch.ones_like(top[:, 0])
        return LocatorPrediction(self.tasks, z.argmin(-1), probs, margin, z)
