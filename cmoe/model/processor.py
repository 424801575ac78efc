"""Turn (image, question[, answer]) rows into model tensors with one documented prompt template.

Template (LLaVA-1.5 style, so real LLaVA checkpoints read it too):

    USER: <image>\\n{question}\\nASSISTANT: {answer}</s>

`<image>` expands to as many image tokens as the vision tower emits (patches, +1 for the CLS
token when the checkpoint uses `vision_feature_select_strategy="full"`). Only the answer and the
closing `</s>` are supervised: the model is never trained to predict the image or the question.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, LlavaConfig, PreTrainedTokenizerBase

PROMPT = "USER: <image>\n{question}\nASSISTANT:"
IGNORE = -100  # label value the loss skips


@dataclass
class Encoded:
    """One example, tokenised once and reused every epoch (tensors on CPU)."""

    pixel_values: torch.Tensor  # (3, H, W)
    input_ids: torch.Tensor  # (T,) prompt (+ answer + eos when training)
    labels: torch.Tensor  # (T,) IGNORE except answer tokens

    def prompt(self) -> Encoded:
        """The example as inference sees it: image + prompt, the answer tokens left out."""
        keep = self.labels == IGNORE
        return Encoded(self.pixel_values, self.input_ids[keep], self.labels[keep])


class VLProcessor:
    """Image preprocessing + tokenisation + image-token expansion for a LLaVA-style checkpoint."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_processor, config: LlavaConfig) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        vc = config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        self.num_image_tokens = n + (1 if config.vision_feature_select_strategy == "full" else 0)
        self.image_token_id = config.image_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id

    @classmethod
    def from_pretrained(cls, path: str | Path, config: LlavaConfig) -> VLProcessor:
        """Load the tokenizer and image processor saved beside a checkpoint (local files only)."""
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        ip = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        return cls(tok, ip, config)

    def _prompt_ids(self, question: str) -> list[int]:
        before, after = PROMPT.format(question=question.strip()).split("<image>")
        enc = self.tokenizer
        return (enc(before, add_special_tokens=False)["input_ids"] + [self.image_token_id] * self.num_image_tokens
                + enc(after, add_special_tokens=False)["input_ids"])

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """Preprocess a list of PIL images into a (B, 3, H, W) float tensor."""
        rgb = [im.convert("RGB") for im in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    def encode(self, image: Image.Image, question: str, answer: str | None = None) -> Encoded:
        """Encode one example; with `answer`, append it and `</s>` as the supervised target."""
        ids = self._prompt_ids(question)
        labels = [IGNORE] * len(ids)
        if answer is not None:
            ans = self.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"] + [self.eos_id]
            ids, labels = ids + ans, labels + ans
        return Encoded(self.pixels([image])[0], torch.tensor(ids), torch.tensor(labels))

    def collate(
        self, batch: list[Encoded], left_pad: bool = False, device: torch.device | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Pad a list of encoded examples (left padding for generation, right for training), on `device`."""
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            n = len(e.input_ids)
            sl = slice(width - n, width) if left_pad else slice(0, n)
            ids[i, sl], labels[i, sl], mask[i, sl] = e.input_ids, e.labels, 1
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels,
               "pixel_values": torch.stack([e.pixel_values for e in batch])}
        return out if device is None else {k: v.to(device) for k, v in out.items()}

    def decode_answers(self, generated: torch.Tensor) -> list[str]:
        """Decode generated continuation ids (prompt already stripped) up to the first `</s>`."""
        return [t.strip() for t in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]
