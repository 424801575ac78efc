"""Tiny random LLaVA models built from config (no downloads) and a batch that fits them."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig, Qwen2Config,
)

IMAGE_TOKEN = 127
N_IMAGE_TOKENS = 5  # (32 / 16)^2 patches + CLS, with vision_feature_select_strategy="full"
TEXT = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}


def tiny_llava(text: str = "llama", seed: int = 0, layers: int = 4) -> LlavaForConditionalGeneration:
    """A random LLaVA: 1-layer CLIP tower on 32 px images, 32-wide text model of `layers` layers."""
    torch.manual_seed(seed)
    text_cfg = TEXT[text](
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, pad_token_id=0,
    )
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=16),
        text_config=text_cfg, image_token_index=IMAGE_TOKEN, vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(cfg).eval()


def make_batch(batch: int = 2, text_len: int = 6, seed: int = 0, low: int = 1, high: int = 100,
               brightness: float = 0.0) -> dict[str, torch.Tensor]:
    """Image tokens followed by random text tokens in [low, high), with random 32 px images."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(low, high, (batch, text_len), generator=g)
    ids = torch.cat([torch.full((batch, N_IMAGE_TOKENS), IMAGE_TOKEN), text], dim=1)
    pixels = torch.randn(batch, 3, 32, 32, generator=g) + brightness
    return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids)}


def cmoe_model(text: str = "llama", seed: int = 0, **moe) -> LlavaForConditionalGeneration:
    """A tiny LLaVA upcycled to CMoE (every other layer, E0 = 4, top-2) with one task, "a"."""
    from cmoe.config import MoEConfig
    from cmoe.model.cmoe_layer import add_task
    from cmoe.model.surgery import convert_to_cmoe

    # every other layer, as the model tests were written for (the default is now every layer)
    model = convert_to_cmoe(tiny_llava(text, seed), MoEConfig(**{"layers": "every_other", **moe}))
    add_task(model, "a")
    return model


def add_distinct_task(model: LlavaForConditionalGeneration, name: str) -> None:
    """Add task `name` with a random expert per CMoE layer and a large router row for it.

    A unit-scale row gives logits of a few units on RMS-normed activations, so the expert wins the
    top-k for a good share of tokens with a large gate: the task's outputs visibly differ.
    """
    from cmoe.model.cmoe_layer import add_expert, add_task, cmoe_layers

    add_task(model, name)
    for i, layer in cmoe_layers(model).items():
        e = add_expert(model, i, "random")
        with torch.no_grad():
            layer.routers[-1][e] = torch.randn(layer.hidden_size)


def train_steps(model: LlavaForConditionalGeneration, task: str, steps: int = 3, seed: int = 1) -> None:
    """A few AdamW (weight decay on) steps of LM + aux loss on `task`'s trainable parameters only."""
    from cmoe.model.cmoe_layer import aux_loss, trainable_parameters
    from cmoe.model.routing import route

    batch = make_batch(batch=4, seed=seed)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN, -100)
    opt = torch.optim.AdamW(trainable_parameters(model, task), lr=1e-2, weight_decay=0.1)
    model.train()
    with route(model, [task] * 4):
        for _ in range(steps):
            loss = model(**batch, labels=labels).loss + aux_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
