"""Which vision-language family a checkpoint is, and how to feed it: one adapter per `config.model_type`.

Everything that differs between the supported families is here, so that the rest of cmoe asks the
adapter instead of assuming LLaVA:

- the model class that loads it;
- where its text decoder is (the module whose `.layers[i].mlp` CMoE upcycles);
- which image inputs its processor returns and its forward reads (`pixel_values` always; LLaVA-NeXT /
  OneVision's `image_sizes`, Qwen2-VL's `image_grid_thw`, Idefics3's `pixel_attention_mask`), and
  how a batch joins them: one row per sample (`stack`, padded with zeros to the largest sample, as
  the families' own processors pad) or every sample's rows end to end (`cat`);
- how its one image placeholder expands in a prompt: as many image tokens as its vision side emits
  for that image (or, for Idefics3 / SmolVLM, its tagged crop layout), computed from the image
  processor's output and the config, as the family's own processor does;
- the parts `cmoe base info` counts.

LLaVA-1.5 (`llava`, the tiny default) is prompted with cmoe's documented template
(cmoe.model.processor.PROMPT); every other family with the chat template saved in its checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import transformers
from transformers import PretrainedConfig, PreTrainedModel
from transformers.image_processing_utils import select_best_resolution

Join = Literal["stack", "cat"]
# (config, the image token as text, the image processor's output for one image) -> the placeholder's expansion
Expansion = Callable[[PretrainedConfig, str, Mapping], str]


@dataclass(frozen=True)
class Family:
    """How cmoe loads, prompts, batches and upcycles one vision-language family."""

    name: str  # what docs and `cmoe base info` call it
    class_name: str  # the transformers model class (imported when a checkpoint loads, not with this table)
    decoder: str  # dotted path from the model to its text decoder (the module with `.layers`)
    image_inputs: Mapping[str, Join]  # the image processor outputs the forward reads, and how a batch joins them
    parts: Mapping[str, str]  # `cmoe base info`'s parameter groups: name -> dotted path
    expand: Expansion | None = None  # None: cmoe's LLaVA-1.5 template; else the checkpoint's chat template
    image_kwargs: Mapping[str, object] = field(default_factory=dict)  # extra arguments of the image processor
    # Qwen2-VL's M-RoPE reads which positions are image tokens (1) and which text (0) beside input_ids.
    token_types: bool = False

    @property
    def model_class(self) -> type[PreTrainedModel]:
        """The transformers class that loads this family's checkpoints."""
        return getattr(transformers, self.class_name)


def _anyres_tokens(config: PretrainedConfig, image: Mapping) -> int:
    """Image tokens LLaVA-NeXT / OneVision emit for one image: the base view, plus its best grid
    pinpoint's patches unpadded back to the image's aspect ratio, one newline per row (and
    OneVision's `anyres_max_N` cap on the grid), as the models' `pack_image_features` lays them."""
    vc = config.vision_config
    side = vc.image_size // vc.patch_size  # patches per side of one view
    height, width = (int(v) for v in image["image_sizes"][0])
    best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
    rows, cols = side * (best_h // vc.image_size), side * (best_w // vc.image_size)
    if width / height > cols / rows:
        rows -= 2 * ((rows - int(round(height * (cols / width), 7))) // 2)
    else:
        cols -= 2 * ((cols - int(round(width * (rows / height), 7))) // 2)
    unpadded, newlines = rows * cols, rows
    if config.model_type == "llava_onevision":
        cap = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (cap * side**2))
        if ratio > 1.1:
            unpadded, newlines = int(rows // ratio) * int(cols // ratio), int(rows // ratio)
    # a CLIP tower emits a CLS token before the patches; "default" drops the first token of each view
    per_view = side * side + vc.model_type.startswith("clip") - (config.vision_feature_select_strategy == "default")
    return per_view + unpadded + newlines


def _qwen_tokens(config: PretrainedConfig, image: Mapping) -> int:
    """Image tokens Qwen2-VL emits: its patch grid, merged `spatial_merge_size`² patches to a token."""
    return int(image["image_grid_thw"][0].prod()) // config.vision_config.spatial_merge_size ** 2


def _repeat(count: Callable[[PretrainedConfig, Mapping], int]) -> Expansion:
    return lambda config, token, image: token * count(config, image)


def _idefics_layout(config: PretrainedConfig, token: str, image: Mapping) -> str:
    """Idefics3 / SmolVLM's image string: each crop tagged by its row and column, then the global view."""
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string  # the layout both share

    vc = config.vision_config
    seq = (vc.image_size // vc.patch_size) ** 2 // config.scale_factor ** 2  # tokens per crop after pixel shuffle
    return get_image_prompt_string(int(image["rows"][0][0]), int(image["cols"][0][0]), seq,
                                   "<fake_token_around_image>", token, "<global-img>")


_LLAVA_PARTS = {"vision_tower": "model.vision_tower", "projector": "model.multi_modal_projector",
                "language_model": "model.language_model", "lm_head": "lm_head"}
_ANYRES = {"pixel_values": "stack", "image_sizes": "stack"}
_QWEN = {"pixel_values": "cat", "image_grid_thw": "cat"}
_QWEN_PARTS = {"vision_tower": "model.visual", "language_model": "model.language_model", "lm_head": "lm_head"}
_IDEFICS = {"pixel_values": "stack", "pixel_attention_mask": "stack"}
_IDEFICS_PARTS = {"vision_tower": "model.vision_model", "projector": "model.connector",
                  "language_model": "model.text_model", "lm_head": "lm_head"}

FAMILIES: dict[str, Family] = {
    "llava": Family("LLaVA-1.5", "LlavaForConditionalGeneration", "model.language_model", {"pixel_values": "stack"},
                    _LLAVA_PARTS),
    "llava_next": Family("LLaVA-NeXT", "LlavaNextForConditionalGeneration", "model.language_model", _ANYRES,
                         _LLAVA_PARTS, _repeat(_anyres_tokens)),
    "llava_onevision": Family("LLaVA-OneVision", "LlavaOnevisionForConditionalGeneration", "model.language_model",
                              {**_ANYRES, "batch_num_images": "cat"}, _LLAVA_PARTS, _repeat(_anyres_tokens)),
    "qwen2_vl": Family("Qwen2-VL", "Qwen2VLForConditionalGeneration", "model.language_model", _QWEN, _QWEN_PARTS,
                       _repeat(_qwen_tokens), token_types=True),
    "qwen2_5_vl": Family("Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "model.language_model", _QWEN,
                         _QWEN_PARTS, _repeat(_qwen_tokens), token_types=True),
    "idefics3": Family("Idefics3", "Idefics3ForConditionalGeneration", "model.text_model", _IDEFICS, _IDEFICS_PARTS,
                       _idefics_layout, {"return_row_col_info": True}),
    "smolvlm": Family("SmolVLM", "SmolVLMForConditionalGeneration", "model.text_model", _IDEFICS, _IDEFICS_PARTS,
                      _idefics_layout, {"return_row_col_info": True}),
}


def family_of(model_type: str | None) -> Family | None:
    """The adapter of a checkpoint's `config.model_type`, or None when cmoe does not support it."""
    return FAMILIES.get(model_type or "")


def family(model_type: str | None) -> Family:
    """The adapter of `model_type`; ValueError naming the supported ones when cmoe has none."""
    found = family_of(model_type)
    if found is None:
        raise ValueError(f"model_type {model_type!r} is not a vision-language family cmoe supports "
                         f"(supported model_type: {', '.join(FAMILIES)})")
    return found


def attribute(root: object, path: str) -> object:
    """`root.a.b` for the dotted `path` "a.b" (a family's decoder or parts)."""
    for name in path.split("."):
        root = getattr(root, name)
    return root
