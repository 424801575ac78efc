"""The CMoE state directory: a JSON manifest, the base by reference (or a copy), one delta per task.

Layout (docs/architecture.md "State format")::

    cmoe.json                          manifest, format_version 1
    base/                              only with copy_base=True: the dense base, HF safetensors
    tasks/<task>/experts.safetensors   experts the task added: layers.<L>.experts.<e>.<param>
    tasks/<task>/router.safetensors    its router per layer: layers.<L>.router  (E_t, d)
    tasks/<task>/locator.safetensors   its PTL VAE, when fitted
    tasks/<task>/delta.safetensors     its change of the base experts, when it grew one:
                                       layers.<L>.delta.<e>.<linear>.a (rank, in) | .b (out, rank)

A task that runs with a delta it inherited (owning none) is listed in the manifest's `delta_uses`
({task: {layer: earlier task}}); a state without the field has no inherited deltas.

Loading = base + conversion with the manifest's MoE config + every task's delta in order, which
reproduces the saved model exactly (the upcycled experts are copies of the base, so they are not
stored). Everything is checked before anything is built: the format version, the base's sha256
(over its safetensors files and its config, tokenizer and processor files; `base.sha256_of`
says so, and a state written before it was recorded is checked over its safetensors files, as
it was written), and for each delta its sha256 and its tensor names, shapes and
dtypes; each failure names the file and what is wrong. safetensors + JSON only, never pickle.
Saving writes into a temporary sibling directory and renames it into place, so a crash never
leaves a half-written state. Delta paths are derived from the task name (validated at
`add_task`), never read from the manifest, so a manifest cannot point outside the directory.
In single-router mode task t's router file holds the current shared router's rows for the experts
that existed after task t, so the last task's file restores the whole shared router.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from cmoe.config import MoEConfig
from cmoe.files import atomic_dir, file_sha256
from cmoe.model.base import load_model, weights_sha256
from cmoe.model.cmoe_layer import BASE, add_delta, add_expert, add_task, cmoe_info, cmoe_layers
from cmoe.model.locator import TaskVAE
from cmoe.model.surgery import convert_to_cmoe, dense_base

FORMAT_VERSION = 1
# What the manifest's base.sha256 covers (base.weights_sha256); states without `base.sha256_of`
# recorded the safetensors files alone.
BASE_HASH_OF, _OLD_BASE_HASH_OF = "weights+config+tokenizer", "weights"
MANIFEST = "cmoe.json"
DELTA_KINDS = ("experts", "router", "locator", "delta")
BaseLoader = Callable[[str], nn.Module]


class StateError(ValueError):
    """A CMoE state directory that cannot be saved or loaded; the message names the file and why."""


# ==================================================================== save
def save_state(
    model: nn.Module, path: str | Path, *, copy_base: bool = False, base_path: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model`'s CMoE state to directory `path` atomically; returns the path.

    The base is referenced by path + sha256 (`base_path`, default: where the model's base was
    loaded from). `copy_base=True` stores it under `base/` so the directory travels alone: the
    base directory's files are copied as they are (tokenizer and processor included) when its
    path is known, else the dense base is rebuilt from the model and written with save_pretrained.
    A base inside `path` itself (a model loaded from a travelling state, saved back in place) is
    always copied along, since replacing `path` would delete it.
    """
    info = cmoe_info(model)
    layers = cmoe_layers(model)
    if any(layer.probe is not None for layer in layers.values()):
        raise StateError("probes are attached: drop or promote them before saving")
    src = Path(base_path or info.base_path) if (base_path or info.base_path) else None
    if src is None and not copy_base:
        raise StateError("the model's base has no path: pass base_path=... or copy_base=True")
    if src is not None:
        sha = weights_sha256(src)
        loaded_from_src = info.base_path is not None and src.resolve() == Path(info.base_path).resolve()
        if loaded_from_src and info.base_sha256 and sha != info.base_sha256:
            raise StateError(f"{src}: base weights changed on disk since the model was loaded "
                             f"(sha256 {sha}, expected {info.base_sha256})")
    path = Path(path)
    if src is not None and src.resolve().is_relative_to(path.resolve()):
        copy_base = True  # the base lives in the directory being replaced: keep it by copying it along
    if path.exists() and not overwrite:
        raise StateError(f"{path}: already exists (pass overwrite=True to replace it)")
    with atomic_dir(path) as tmp:
        if copy_base:
            if src is not None:
                shutil.copytree(src, tmp / "base")
            else:
                dense_base(model).save_pretrained(tmp / "base")
            base_entry = {"path": "base", "copied": True, "sha256": weights_sha256(tmp / "base")}
        else:
            assert src is not None
            base_entry = {"path": str(src.resolve()), "copied": False, "sha256": sha}
        base_entry["sha256_of"] = BASE_HASH_OF
        deltas = {task: _write_task(model, tmp, t, task) for t, task in enumerate(info.tasks)}
        manifest = {
            "format_version": FORMAT_VERSION,
            "base": base_entry,
            "moe": {
                "layers": list(layers), "initial_experts": info.initial_experts, "top_k": info.top_k,
                "aux_loss_coef": info.aux_loss_coef, "router": "single" if info.single_router else "per_task",
            },
            "locator": {"temperature": info.locator.temperature},
            "tasks": list(info.tasks),
            "task_records": {task: info.task_records.get(task, {}) for task in info.tasks},
            "experts": {str(i): list(layer.expert_origin) for i, layer in layers.items()},
            "compactions": list(info.compactions),  # what each `cmoe compact` retired and merged
            "delta_uses": inherited_deltas(model),
            "deltas": deltas,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def inherited_deltas(model: nn.Module) -> dict[str, dict[str, str]]:
    """{task: {layer: the earlier task whose delta it runs with}} for every task that owns none there."""
    info, uses = cmoe_info(model), {}
    for t, task in enumerate(info.tasks):
        used = {str(i): info.tasks[u] for i, layer in cmoe_layers(model).items()
                if t < len(layer.delta_uses) and (u := layer.delta_uses[t]) is not None and u != t}
        if used:
            uses[task] = used
    return uses


def _write_task(model: nn.Module, root: Path, t: int, task: str) -> dict[str, dict]:
    """Write task `task`'s delta files; returns their manifest entries (sha256, tensors)."""
    info = cmoe_info(model)
    experts: dict[str, torch.Tensor] = {}
    routers: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    for i, layer in cmoe_layers(model).items():
        for e, (origin, expert) in enumerate(zip(layer.expert_origin, layer.experts)):
            if origin == task:
                experts |= {f"layers.{i}.experts.{e}.{k}": v for k, v in expert.state_dict().items()}
        if info.single_router:
            # the shared router's rows for the experts that existed after task t: shapes replay in
            # order on load, and the last task's file (the whole current router) is what remains
            known = {BASE, *info.tasks[: t + 1]}
            routers[f"layers.{i}.router"] = layer.routers[0][: sum(o in known for o in layer.expert_origin)]
        else:
            routers[f"layers.{i}.router"] = layer.routers[t]
            deltas |= {f"layers.{i}.delta.{k}": v for k, v in layer.deltas[t].state_dict().items()}
    tensors = {"experts": experts, "router": routers}
    if deltas:
        tensors["delta"] = deltas
    if task in info.locator.vaes:
        tensors["locator"] = info.locator.vaes[task].state_dict()
    folder = root / "tasks" / task
    folder.mkdir(parents=True)
    entries = {}
    for kind, named in tensors.items():
        file = folder / f"{kind}.safetensors"
        save_file({k: v.detach().contiguous() for k, v in named.items()}, file, metadata={"format": "pt"})
        entries[kind] = {"sha256": file_sha256(file), "tensors": _tensor_specs(file)}
    return entries


# ==================================================================== load
def load_state(path: str | Path, base_loader: BaseLoader | None = None) -> nn.Module:
    """Rebuild the CMoE model saved in `path`: verified base + conversion + every task delta in order.

    `base_loader(dir) -> model` loads the dense base (default: the local checkpoint, by its family).
    """
    root = Path(path)
    manifest = verify_state(root)
    base_dir = base_folder(root, manifest)
    # What a later save_state compares the base with: today's identity (an older state's is re-hashed).
    sha = manifest["base"]["sha256"] if manifest["base"].get("sha256_of") == BASE_HASH_OF else weights_sha256(base_dir)
    model = (base_loader or load_model)(str(base_dir))
    moe = manifest["moe"]
    convert_to_cmoe(
        model, MoEConfig(layers=moe["layers"], initial_experts=moe["initial_experts"], top_k=moe["top_k"],
                         aux_loss_coef=moe["aux_loss_coef"]),
        single_router=moe["router"] == "single", base_path=str(base_dir.resolve()),
    )
    info = cmoe_info(model)
    info.base_sha256 = sha
    info.locator.temperature = manifest["locator"]["temperature"]
    info.task_records = {task: dict(manifest.get("task_records", {}).get(task, {})) for task in manifest["tasks"]}
    info.compactions = list(manifest.get("compactions", []))  # absent in states written before compaction
    for t, task in enumerate(manifest["tasks"]):
        _apply_task(model, root, t, task, manifest)
    return model


def verify_state(path: str | Path) -> dict:
    """Check a state directory as a load would, without building the model: manifest fields, the
    base's sha256, every delta's sha256 and tensors. Its manifest; StateError naming what is wrong."""
    root = Path(path)
    manifest = read_manifest(root)
    _checked_base(base_folder(root, manifest), manifest["base"])
    for task in manifest["tasks"]:
        for kind, entry in manifest["deltas"][task].items():
            _verify_delta(root / "tasks" / task / f"{kind}.safetensors", entry)
    return manifest


def base_folder(root: Path, manifest: dict) -> Path:
    """Where the state's base is: its own copy, or the path the manifest names."""
    return root / "base" if manifest["base"]["copied"] else Path(manifest["base"]["path"])


_REQUIRED = {  # section -> fields every load reads
    "base": ("path", "copied", "sha256"),
    "moe": ("layers", "initial_experts", "top_k", "aux_loss_coef", "router"),
    "locator": ("temperature",),
}


def read_manifest(root: Path) -> dict:
    """The parsed `cmoe.json` of a state directory, with its format version and fields checked."""
    file = root / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise StateError(f"{file}: no CMoE manifest (not a state directory)") from None
    except json.JSONDecodeError as e:
        raise StateError(f"{file}: not valid JSON: {e}") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StateError(f"{file}: format_version {version!r} is unknown; this cmoe reads {FORMAT_VERSION}")
    missing = [k for k in ("tasks", "experts", "deltas") if k not in manifest]
    missing += [f"{section}.{k}" for section, keys in _REQUIRED.items() for k in keys
                if k not in manifest.get(section, {})]
    if missing:
        raise StateError(f"{file}: missing fields {missing}")
    for task in manifest["tasks"]:
        kinds = manifest["deltas"].get(task, {})
        if {"experts", "router"} - kinds.keys() or kinds.keys() - set(DELTA_KINDS):
            raise StateError(f"{file}: task {task!r} needs experts and router deltas (optionally locator and delta), "
                             f"has {sorted(kinds)}")
        bad = [kind for kind, entry in kinds.items() if not {"sha256", "tensors"} <= entry.keys()]
        if bad:
            raise StateError(f"{file}: task {task!r} deltas {bad} lack sha256 or tensors")
    e0, known = manifest["moe"]["initial_experts"], {BASE, *manifest["tasks"]}
    for layer, origins in manifest["experts"].items():
        if origins[:e0] != [BASE] * e0 or not known.issuperset(origins):
            raise StateError(f"{file}: layer {layer} experts {origins} must be {e0} '{BASE}' copies, then known tasks")
    return manifest


def _checked_base(base_dir: Path, entry: dict) -> None:
    """StateError unless the base folder's identity is the manifest's `base.sha256` (over what `sha256_of` says)."""
    if not base_dir.is_dir():
        raise StateError(f"{base_dir}: the base directory named by the manifest does not exist")
    covers = entry.get("sha256_of", _OLD_BASE_HASH_OF)
    if covers not in (BASE_HASH_OF, _OLD_BASE_HASH_OF):
        raise StateError(f"{base_dir}: the manifest's base.sha256_of {str(covers)[:80]!r} is unknown to this cmoe")
    sha = weights_sha256(base_dir, weights_only=covers == _OLD_BASE_HASH_OF)
    if sha != entry["sha256"]:
        raise StateError(f"{base_dir}: base sha256 {sha} differs from the manifest's {entry['sha256']} "
                         f"(over its {covers}: a different or modified base)")


def _verify_delta(file: Path, entry: dict) -> None:
    """Refuse a delta file whose bytes or tensors (names, shapes, dtypes) differ from the manifest."""
    if not file.is_file():
        raise StateError(f"{file}: delta file missing")
    sha = file_sha256(file)
    if sha != entry["sha256"]:
        raise StateError(f"{file}: sha256 {sha} does not match the manifest's {entry['sha256']} "
                         "(corrupted or modified delta)")
    specs, expected = _tensor_specs(file), entry["tensors"]
    if specs.keys() != expected.keys():
        raise StateError(f"{file}: tensor names differ from the manifest: missing "
                         f"{sorted(expected.keys() - specs.keys())}, unexpected {sorted(specs.keys() - expected.keys())}")
    for name, spec in specs.items():
        if spec != expected[name]:
            raise StateError(f"{file}: tensor {name} is {spec}, the manifest says {expected[name]}")


def _apply_task(model: nn.Module, root: Path, t: int, task: str, manifest: dict) -> None:
    """Replay task `task`: add its router and experts, then fill them from its (verified) delta."""
    folder = root / "tasks" / task
    add_task(model, task)
    info = cmoe_info(model)
    with safe_open(folder / "experts.safetensors", "pt") as f:
        for i, layer in cmoe_layers(model).items():
            origins = manifest["experts"].get(str(i), [])
            for e, origin in enumerate(origins):
                if origin != task:
                    continue
                if add_expert(model, i, "copy", 0) != e:
                    raise StateError(f"{root / MANIFEST}: layer {i} expert {e} of task "
                                     f"{task!r} is out of task order {origins}")
                prefix = f"layers.{i}.experts.{e}."
                _load_into(layer.experts[e], {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)},
                           folder / "experts.safetensors")
    with safe_open(folder / "router.safetensors", "pt") as f, torch.no_grad():
        for i, layer in cmoe_layers(model).items():
            router = layer.routers[0 if info.single_router else t]
            value = f.get_tensor(f"layers.{i}.router")
            if value.shape != router.shape:
                raise StateError(f"{folder / 'router.safetensors'}: layers.{i}.router has shape {list(value.shape)}, "
                                 f"the model's experts need {list(router.shape)}")
            router.copy_(value)
    for i, source in manifest.get("delta_uses", {}).get(task, {}).items():
        layers = cmoe_layers(model)
        if source not in manifest["tasks"][:t] or not i.isdigit() or int(i) not in layers:
            raise StateError(f"{root / MANIFEST}: delta_uses of task {task!r}: layer {i} from {source!r} "
                             f"is not an earlier task in a CMoE layer (tasks {manifest['tasks'][:t]}, layers {list(layers)})")
        layers[int(i)].inherit_delta(manifest["tasks"].index(source))
    if "delta" in manifest["deltas"][task]:
        _apply_delta(model, folder / "delta.safetensors")
    if "locator" in manifest["deltas"][task]:
        with safe_open(folder / "locator.safetensors", "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        hidden, n_features = tensors["enc.weight"].shape
        vae = TaskVAE(n_features, hidden, tensors["enc_out.weight"].shape[0] // 2)
        _load_into(vae, tensors, folder / "locator.safetensors")
        info.locator.add_task(task, vae.requires_grad_(False).eval())


def _apply_delta(model: nn.Module, file: Path) -> None:
    """Give the task just added the delta of `file` in each layer that has one (its rank read off A)."""
    with safe_open(file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layers = cmoe_layers(model)
    if unknown := sorted({k.split(".")[1] for k in tensors} - {str(i) for i in layers}):
        raise StateError(f"{file}: deltas for layers {unknown}, which are not CMoE layers (CMoE layers: {list(layers)})")
    for i, layer in layers.items():
        prefix = f"layers.{i}.delta."
        mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if mine:
            rank = next((v.shape[0] for k, v in mine.items() if k.endswith(".a") and v.dim() == 2), None)
            if rank is None:
                raise StateError(f"{file}: layer {i}'s delta has no (rank, in) A matrix")
            add_delta(model, i, rank)
            _load_into(layer.deltas[-1], mine, file)


def _load_into(module: nn.Module, tensors: dict[str, torch.Tensor], file: Path) -> None:
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise StateError(f"{file}: does not fit the model: {e}") from None


def _tensor_specs(file: Path) -> dict[str, dict]:
    """Name -> {shape, dtype} of every tensor in a safetensors file, read from its header."""
    with safe_open(file, "pt") as f:
        return {k: {"shape": list(f.get_slice(k).get_shape()), "dtype": f.get_slice(k).get_dtype()} for k in f.keys()}
