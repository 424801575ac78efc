"""The trained MoE base: a base folder's E0 experts and base router per CMoE layer, beside the dense checkpoint.

A base folder is a standard Hugging Face LLaVA checkpoint (the dense model, as pretrained). After
the MoE stage (`cmoe.stages.moe_stage`) it also holds `MOE_FILE`: for every CMoE layer its E0
trained experts (`layers.<L>.experts.<e>.<param>`) and the base router (`layers.<L>.router`,
shape (E0, d)); the layout (layers, E0, top-k, aux weight) is in the file's metadata. Upcycling a
base with this file loads the trained experts instead of copying the dense MLP, and every new
task's router starts from the base router. The base's identity (`base.weights_sha256`, over all
its safetensors files) covers the file, so a CMoE state that references the base by path and
hash, or copies the folder, carries the trained experts with it. A ready MoE checkpoint is such
a folder. safetensors only, never pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from cmoe.model.cmoe_layer import cmoe_info, cmoe_layers

MOE_FILE = "cmoe_moe.safetensors"
_LAYOUT_KEY = "cmoe_moe"  # metadata entry holding the layout as JSON


class MoEBaseError(ValueError):
    """A base folder's MoE file that cannot be used with this model; the message names the file and why."""


def save_moe_base(model: nn.Module, folder: str | Path) -> Path:
    """Write the E0 base experts and the base router (router 0) of every CMoE layer of `model` into `folder`."""
    info = cmoe_info(model)
    layers = cmoe_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in layers.items():
        if len(layer.routers) != 1 or info.tasks:
            raise MoEBaseError(f"CMoE layer {i}: a MoE base has exactly one (base) router and no tasks")
        for e, expert in enumerate(layer.experts[: info.initial_experts]):
            tensors |= {f"layers.{i}.experts.{e}.{k}": v for k, v in expert.state_dict().items()}
        tensors[f"layers.{i}.router"] = layer.routers[0]
    layout = {"layers": list(layers), "initial_experts": info.initial_experts, "top_k": info.top_k,
              "aux_loss_coef": info.aux_loss_coef}
    file = Path(folder) / MOE_FILE
    # One metadata entry only: safetensors writes the metadata map in Rust HashMap order, which
    # changes from call to call, so two entries would make the bytes (and the base's hash) vary.
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, file,
              metadata={_LAYOUT_KEY: json.dumps(layout, sort_keys=True)})
    return file


def read_layout(folder: str | Path) -> dict | None:
    """The MoE layout saved in `folder` (layers, initial_experts, top_k, aux_loss_coef); None for a dense base."""
    file = Path(folder) / MOE_FILE
    if not file.is_file():
        return None
    with safe_open(file, "pt") as f:
        meta = f.metadata() or {}
    try:
        return json.loads(meta[_LAYOUT_KEY])
    except (KeyError, json.JSONDecodeError):
        raise MoEBaseError(f"{file}: no valid '{_LAYOUT_KEY}' layout in its metadata") from None


def load_moe_base(model: nn.Module, folder: str | Path) -> bool:
    """Fill a freshly converted model's E0 experts and base routers from `folder`; False for a dense base."""
    layout = read_layout(folder)
    if layout is None:
        return False
    file = Path(folder) / MOE_FILE
    info = cmoe_info(model)
    layers = cmoe_layers(model)
    if layout["layers"] != list(layers) or layout["initial_experts"] != info.initial_experts:
        raise MoEBaseError(
            f"{file}: the base was trained as MoE layers {layout['layers']} with {layout['initial_experts']} "
            f"experts; the config asks for layers {list(layers)} with {info.initial_experts} (set moe.layers and "
            "moe.initial_experts to match, or rebuild the base)")
    with safe_open(file, "pt") as f, torch.no_grad():
        names = set(f.keys())
        for i, layer in layers.items():
            for e, expert in enumerate(layer.experts):
                prefix = f"layers.{i}.experts.{e}."
                try:
                    expert.load_state_dict({k[len(prefix):]: f.get_tensor(k) for k in names if k.startswith(prefix)})
                except RuntimeError as err:
                    raise MoEBaseError(f"{file}: layer {i} expert {e} does not fit the model: {err}") from None
            key = f"layers.{i}.router"
            router = f.get_tensor(key) if key in names else None
            if router is None or tuple(router.shape) != (info.initial_experts, layer.hidden_size):
                got = "missing" if router is None else list(router.shape)
                raise MoEBaseError(f"{file}: {key} is {got}, need [{info.initial_experts}, {layer.hidden_size}]")
            layer.base_router = router.to(next(layer.experts[0].parameters()).dtype)
    return True
