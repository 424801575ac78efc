"""The frozen vision-language base: build the tiny default from config, or load a local checkpoint.

The tiny default is a real `LlavaForConditionalGeneration` (CLIP vision tower → projector → Llama
text model), so every code path that handles it also handles real LLaVA checkpoints with Llama,
Qwen2 or Mistral text models. Local checkpoints of the other supported families (LLaVA-NeXT /
OneVision, Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM: cmoe.model.families) load the same way,
each with its own processor inputs and chat template. Nothing is ever downloaded: a path that is
not a local checkpoint of a supported family fails at once with a clear message.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from cmoe.config import AttnImplementation, BaseDtype, BaseModelConfig
from cmoe.model.families import FAMILIES, attribute, family, family_of
from cmoe.model.processor import VLProcessor, read_chat_template
from cmoe.model.surgery import not_gated
from cmoe.model.tokenizer import BOS, EOS, IMAGE, PAD, SPECIAL_TOKENS

SUPPORTED_TEXT_MODELS = ("llama", "qwen2", "mistral")


class BaseModelError(ValueError):
    """A base checkpoint that cannot be used; the message says which path and why."""


def tiny_llava_config(cfg: BaseModelConfig, vocab_size: int | None = None,
                      special_ids: dict[str, int] | None = None) -> LlavaConfig:
    """The tiny LLaVA's architecture sized by `cfg`; without a trained tokenizer's figures (sizing),
    `cfg.vocab_size` tokens with the special tokens at the ids `train_tokenizer` gives them."""
    ids = special_ids or {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_hidden * 4,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size,
    )
    text = LlamaConfig(
        hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads, vocab_size=vocab_size or cfg.vocab_size,
        max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=ids[PAD], bos_token_id=ids[BOS], eos_token_id=ids[EOS],
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=ids[IMAGE],
        # "full" keeps the CLS token: one extra image token, a global summary of the image.
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )


def build_tiny_llava(cfg: BaseModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlavaForConditionalGeneration:
    """A freshly initialised tiny LLaVA sized by `cfg`, seeded by `cfg.seed`."""
    config = tiny_llava_config(cfg, len(tokenizer), {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS})
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def tiny_image_processor(cfg: BaseModelConfig) -> CLIPImageProcessorPil:
    """Resize to the tower's input size and normalise to [-1, 1]; no crop (images are square)."""
    return CLIPImageProcessorPil(
        size={"height": cfg.image_size, "width": cfg.image_size}, do_center_crop=False,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


def check_local_checkpoint(path: str | Path) -> Path:
    """Fail fast, with the reason, unless `path` is a local checkpoint directory of a supported family."""
    p = Path(path)
    if not p.exists():
        raise BaseModelError(
            f"{path}: no such local directory. cmoe never downloads models: download the checkpoint "
            "yourself (e.g. `hf download ID --local-dir DIR`) and pass the directory.")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise BaseModelError(f"{p}: not a Hugging Face checkpoint (config.json missing)")
    cfg = json.loads(cfg_file.read_text())
    fam = family_of(cfg.get("model_type"))
    if fam is None:
        raise BaseModelError(f"{cfg_file}: model_type is {cfg.get('model_type')!r}, not a vision-language family "
                             f"cmoe supports (supported model_type: {', '.join(FAMILIES)})")
    if fam.expand is None:  # LLaVA-1.5: the text models its documented template was checked on
        text_type = cfg.get("text_config", {}).get("model_type", "llama")
        if text_type not in SUPPORTED_TEXT_MODELS:
            raise BaseModelError(f"{cfg_file}: text model {text_type!r} is not supported "
                                 f"(supported: {', '.join(SUPPORTED_TEXT_MODELS)})")
    elif read_chat_template(p) is None:
        raise BaseModelError(f"{p}: no chat template (chat_template.jinja, chat_template.json, processor_config.json "
                             f"or tokenizer_config.json): cmoe prompts {fam.name} checkpoints with their own")
    if not any(p.glob("*.safetensors")):
        raise BaseModelError(f"{p}: no *.safetensors weights (cmoe never unpickles .bin checkpoints)")
    return p


def check_attention(attn_implementation: AttnImplementation) -> None:
    """BaseModelError unless this machine can run `attn_implementation`: flash_attention_2 needs the
    flash-attn package (looked up, not imported: it loads CUDA) and a CUDA device."""
    if attn_implementation != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise BaseModelError("base.attn_implementation: flash_attention_2 needs the flash-attn package, which is "
                             "not installed here (pip install flash-attn on the GPU machine, or use sdpa)")
    if not torch.cuda.is_available():
        raise BaseModelError("base.attn_implementation: flash_attention_2 needs a CUDA GPU and this machine has "
                             "none (use sdpa)")


def load_model(path: str | Path, dtype: BaseDtype = "float32",
               attn_implementation: AttnImplementation = "sdpa") -> PreTrainedModel:
    """A local checkpoint's model (by its family's class, safetensors only) in eval mode, its weights in
    `dtype` whatever the checkpoint stores (base.dtype) and its attention `attn_implementation`;
    BaseModelError when this machine cannot run that attention or the text decoder has no gated MLP
    for CMoE to upcycle."""
    p = check_local_checkpoint(path)
    check_attention(attn_implementation)
    fam = family(json.loads((p / "config.json").read_text())["model_type"])
    model = fam.model_class.from_pretrained(p, local_files_only=True, use_safetensors=True,
                                            dtype=getattr(torch, dtype), attn_implementation=attn_implementation)
    problem = not_gated(model)
    if problem:
        raise BaseModelError(f"{p}: this {fam.name} checkpoint's text decoder cannot be upcycled: {problem}")
    return model.eval()


def load_base(path: str | Path, dtype: BaseDtype = "float32",
              attn_implementation: AttnImplementation = "sdpa") -> tuple[PreTrainedModel, VLProcessor]:
    """Load a local checkpoint of a supported family and its processor, frozen and in eval mode."""
    model = load_model(path, dtype, attn_implementation)
    model.requires_grad_(False)
    return model, VLProcessor.from_pretrained(Path(path), model.config)


def save_base(model: LlavaForConditionalGeneration, processor: VLProcessor, out: Path) -> None:
    """Save weights (safetensors), tokenizer and image processor as a standard HF checkpoint."""
    model.save_pretrained(out, safe_serialization=True)
    processor.tokenizer.save_pretrained(out)
    processor.image_processor.save_pretrained(out)


# Beside the weights, the files that make a base answer as it does, whichever of them a checkpoint
# has: its architecture, its generation defaults, its tokenizer and its image processor. A changed
# config or tokenizer changes every answer as surely as changed weights.
IDENTITY_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "tokenizer.model", "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja")


def weights_sha256(path: str | Path, *, weights_only: bool = False) -> str:
    """sha256 over the base's identity (names and bytes): its safetensors files and the `IDENTITY_FILES`
    beside them; `weights_only`: the safetensors files alone, the identity older states recorded."""
    root = Path(path)
    files = sorted(root.glob("*.safetensors"))
    if not weights_only:
        files += [root / name for name in IDENTITY_FILES if (root / name).is_file()]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def describe(model: PreTrainedModel) -> dict:
    """Family, backbone types, parameter counts and layer counts, for `cmoe base info`."""
    cfg = model.config
    fam = family(cfg.model_type)
    vc, tc = cfg.vision_config, cfg.text_config
    return {
        "family": fam.name,
        "vision_type": vc.model_type,
        "text_type": tc.model_type,
        # Qwen2-VL reads any size (its patch grid follows the image): it has no fixed image_size
        "image_size": getattr(vc, "image_size", None),
        "patch_size": vc.patch_size,
        "vision_layers": getattr(vc, "num_hidden_layers", getattr(vc, "depth", None)),
        "text_layers": tc.num_hidden_layers,
        "text_hidden": tc.hidden_size,
        "vocab_size": tc.vocab_size,
        "params": {k: sum(p.numel() for p in attribute(model, path).parameters()) for k, path in fam.parts.items()},
        "params_total": sum(p.numel() for p in model.parameters()),
    }
