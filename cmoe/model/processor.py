"""Turn (image, question[, answer]) rows into model tensors, prompted as the checkpoint's family expects.

LLaVA-1.5 checkpoints (the tiny default among them) read one documented template:

    USER: <image>\\n{question}\\nASSISTANT: {answer}</s>

`<image>` expands to as many image tokens as the vision tower emits (patches, +1 for the CLS
token when the checkpoint uses `vision_feature_select_strategy="full"`). Every other family
(cmoe.model.families) is prompted with the chat template saved in its checkpoint: one user turn
holding the image and the question, then the generation prompt; the template's image placeholder
expands as that family's own processor expands it. In both, the answer follows the prompt (after a
space unless the prompt ends in one) and ends with the tokenizer's end-of-sequence token; only the
answer and that token are supervised: the model is never trained to predict the image or the question.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from cmoe.model.families import Family, Join, family

PROMPT = "USER: <image>\n{question}\nASSISTANT:"
IGNORE = -100  # label value the loss skips


@dataclass
class Encoded:
    """One example, tokenised once and reused every epoch (tensors on CPU)."""

    images: dict[str, torch.Tensor]  # the family's image inputs for this example (LLaVA: pixel_values (3, H, W))
    input_ids: torch.Tensor  # (T,) prompt (+ answer + eos when training)
    labels: torch.Tensor  # (T,) IGNORE except answer tokens

    def prompt(self) -> Encoded:
        """The example as inference sees it: image + prompt, the answer tokens left out."""
        keep = self.labels == IGNORE
        return Encoded(self.images, self.input_ids[keep], self.labels[keep])


def read_chat_template(path: str | Path) -> str | None:
    """The chat template saved in a checkpoint folder: chat_template.jinja, else the one in
    chat_template.json, processor_config.json or tokenizer_config.json; None when it has none."""
    root = Path(path)
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        if (root / name).is_file():
            template = json.loads((root / name).read_text()).get("chat_template")
            if isinstance(template, list):  # several named templates: the default one
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
            if template:
                return template
    return None


def _join(values: list[torch.Tensor], how: Join) -> torch.Tensor:
    """A batch of one image input: samples end to end (`cat`), or stacked, each zero-padded to the
    largest sample in every dimension (`stack`: what the families' processors pad with)."""
    if how == "cat":
        return torch.cat(values)
    shape = torch.Size(max(sizes) for sizes in zip(*(v.shape for v in values)))
    if all(v.shape == shape for v in values):
        return torch.stack(values)
    out = values[0].new_zeros((len(values), *shape))
    for i, v in enumerate(values):
        out[(i, *(slice(0, n) for n in v.shape))] = v
    return out


class VLProcessor:
    """Image preprocessing + tokenisation + image-token expansion for a checkpoint of a supported family."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_processor, config: PretrainedConfig,
                 chat_template: str | None = None) -> None:
        """`chat_template` prompts a chat family (required for every family but LLaVA-1.5, which reads PROMPT)."""
        fam = family(config.model_type)
        if (fam.expand is None) != (chat_template is None):
            raise ValueError(f"{fam.name}: cmoe prompts LLaVA-1.5 with its own template and the other supported "
                             "families with their checkpoint's chat template")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.family: Family = fam
        self.chat_template = chat_template
        self.image_token_id = config.image_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id

    @classmethod
    def from_pretrained(cls, path: str | Path, config: PretrainedConfig) -> VLProcessor:
        """Load the tokenizer, image processor and (for a chat family) chat template saved beside a checkpoint."""
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        ip = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        chat = family(config.model_type).expand is not None
        return cls(tok, ip, config, read_chat_template(path) if chat else None)

    def _llava_prompt(self, question: str) -> tuple[str, list[int]]:
        vc = self.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2 + (1 if self.config.vision_feature_select_strategy == "full" else 0)
        text = PROMPT.format(question=question.strip())
        before, after = text.split("<image>")
        enc = self.tokenizer
        return text, (enc(before, add_special_tokens=False)["input_ids"] + [self.image_token_id] * n
                      + enc(after, add_special_tokens=False)["input_ids"])

    def _chat_prompt(self, question: str, image: Mapping) -> tuple[str, list[int]]:
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.strip()}]}]
        text = self.tokenizer.apply_chat_template(turn, chat_template=self.chat_template, add_generation_prompt=True,
                                                  tokenize=False)
        token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        if text.count(token) != 1:
            raise ValueError(f"the chat template renders {text.count(token)} image placeholders {token!r} for one "
                             f"image (a {self.family.name} template shows each image as one {token!r})")
        assert self.family.expand is not None
        expanded = text.replace(token, self.family.expand(self.config, token, image))
        # the template writes any special tokens the family wants (a BOS among them)
        return text, self.tokenizer(expanded, add_special_tokens=False)["input_ids"]

    def image_inputs(self, image: Image.Image) -> tuple[dict[str, torch.Tensor], Mapping]:
        """One image's inputs as an example keeps them (a `stack` input without its batch axis), and the
        image processor's whole output."""
        out = self.image_processor(images=[image.convert("RGB")], return_tensors="pt", **self.family.image_kwargs)
        return {k: out[k][0] if how == "stack" else out[k] for k, how in self.family.image_inputs.items()}, out

    def encode(self, image: Image.Image, question: str, answer: str | None = None) -> Encoded:
        """Encode one example; with `answer`, append it and the end-of-sequence token as the supervised target."""
        images, processed = self.image_inputs(image)
        text, ids = self._chat_prompt(question, processed) if self.chat_template else self._llava_prompt(question)
        labels = [IGNORE] * len(ids)
        if answer is not None:
            sep = "" if text[-1:].isspace() else " "
            ans = self.tokenizer(sep + answer.strip(), add_special_tokens=False)["input_ids"] + [self.eos_id]
            ids, labels = ids + ans, labels + ans
        return Encoded(images, torch.tensor(ids), torch.tensor(labels))

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
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        out |= {k: _join([e.images[k] for e in batch], how) for k, how in self.family.image_inputs.items()}
        if self.family.token_types:
            out["mm_token_type_ids"] = (ids == self.image_token_id).long()
        return out if device is None else {k: v.to(device) for k, v in out.items()}

    def decode_answers(self, generated: torch.Tensor) -> list[str]:
        """Decode generated continuation ids (prompt already stripped) up to the first end-of-sequence token."""
        return [t.strip() for t in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]
