"""Build the tiny default base: train a tokenizer, pretrain a tiny LLaVA on captions, run the MoE stage, save it.

The continual stages only ever train experts and routers over a *frozen* base, and an expert can
only re-route what the base already computes: the base must see every attribute the tasks ask
about and be able to say every answer word. So it is pretrained, all weights, on a captioning
corpus whose descriptions name colour, shape, count, letter and region of every image style.
Then the MoE stage (`cmoe.stages.moe_stage`, `base.moe_epochs` > 0) upcycles the chosen MLPs and
trains their experts and a base router on the same corpus; the base folder is the dense HF
checkpoint plus those experts and router (`cmoe.model.moe_base`).
Deterministic for a seed; cached by a recipe hash (config + corpus), so a second build is free.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cmoe.config import BaseModelConfig, MoEConfig
from cmoe.data.guard import training_scope
from cmoe.data.loading import load_split
from cmoe.data.validate import open_bundle
from cmoe.data.styleshift import styleshift_split
from cmoe.data.synth import caption_attributes, write_pretrain_corpus
from cmoe.files import atomic_dir
from cmoe.model.base import build_tiny_llava, save_base, tiny_image_processor, weights_sha256
from cmoe.model.inference import answer
from cmoe.model.moe_base import save_moe_base
from cmoe.model.processor import PROMPT, VLProcessor
from cmoe.model.tokenizer import train_tokenizer
from cmoe.stages.base_eval import score_styleshift
from cmoe.stages.moe_stage import run_moe_stage
from cmoe.stages.trainer import GlobalBatch, TrainSpec, train

CARD = "cmoe_base.json"  # written last into the base folder: its presence means "complete"
STYLESHIFT_ROWS = 250  # style-shifted check rows scored into the card (50 per attribute)


@dataclass
class BaseBuildResult:
    """What `build_base` produced; JSON-serialisable."""

    path: str
    reused: bool
    recipe_sha256: str
    weights_sha256: str
    params_total: int
    heldout: dict  # caption exact match and attribute recall, with the chance baselines
    styleshift: dict  # answers on the style-shifted suite vs the text-only prior (cmoe.stages.base_eval)
    # The MoE stage's log (its training, expert utilisation and pairwise output similarity, the MoE
    # base's held-out and style-shifted scores); None for a dense base (base.moe_epochs = 0)
    moe_stage: dict | None
    train: dict | None  # TrainResult of the pretraining (None when reused)
    wall_s: float
    # Seconds per build phase (corpus, tokenizer, pretrain, evaluation, moe_stage, moe_evaluation):
    # where the build's time goes; empty on cards written before it was recorded.
    phases_s: dict[str, float] = field(default_factory=dict)


@contextmanager
def _timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time to phases[name]."""
    t0 = time.perf_counter()
    yield
    phases[name] = round(phases.get(name, 0.0) + time.perf_counter() - t0, 1)


def lm_loss(model: torch.nn.Module, batch: dict, glob: GlobalBatch) -> torch.Tensor:
    """Next-token loss on the supervised tokens: this micro-batch's share of the global token mean."""
    return model(**batch, num_items_in_batch=glob.label_tokens).loss


# The MoE settings that shape the base's MoE stage; the others (e.g. a cap on growth) act only on the
# continual stages and must not invalidate a built base.
MOE_RECIPE_FIELDS = {"layers", "initial_experts", "top_k", "aux_loss_coef"}


def _recipe(cfg: BaseModelConfig, moe: MoEConfig, corpus_sha: str) -> str:
    fields = {"base": cfg.model_dump(exclude={"path"}), "corpus": corpus_sha}
    if cfg.moe_epochs:  # the MoE layout shapes the saved experts
        fields["moe"] = moe.model_dump(include=MOE_RECIPE_FIELDS)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def build_base(
    cfg: BaseModelConfig, out: Path, corpus: Path | None = None, cache_dir: Path | None = None, *, moe: MoEConfig,
) -> BaseBuildResult:
    """Pretrain the tiny base and run its MoE stage (layout `moe`) into `out` (reused for the same recipe)."""
    t0 = time.perf_counter()
    out = Path(out)
    phases: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        with _timed(phases, "corpus"):
            if corpus is None:
                corpus = write_pretrain_corpus(Path(tmp) / "pretrain", seed=cfg.seed, n_train=cfg.pretrain_samples,
                                               varied_share=cfg.varied_share)
            cache_dir = cache_dir or Path(tmp) / "cache"
            bundle = open_bundle(corpus, cache_dir=cache_dir)  # validated and hashed once
        recipe = _recipe(cfg, moe, bundle.sha256)
        card = out / CARD
        if card.is_file() and json.loads(card.read_text()).get("recipe_sha256") == recipe:
            saved = json.loads(card.read_text())
            saved.pop("config", None)  # the card also records the config; not a result field
            return BaseBuildResult(**{**saved, "reused": True, "train": None, "wall_s": time.perf_counter() - t0})

        with _timed(phases, "tokenizer"):
            with training_scope(bundle, {}):  # the corpus is this stage's own training data
                train_rows = load_split(bundle, "train", cache_dir=cache_dir)
            test_rows = load_split(bundle, "test", cache_dir=cache_dir)
            texts = list(train_rows["question"]) + list(train_rows["answer"]) + [PROMPT]
            tokenizer = train_tokenizer(texts, cfg.vocab_size)
            model = build_tiny_llava(cfg, tokenizer)
            processor = VLProcessor(tokenizer, tiny_image_processor(cfg), model.config)
            # Tokenise once; every epoch reuses the tensors (the trainer only permutes indices).
            data = [processor.encode(r["image"], r["question"], r["answer"]) for r in train_rows]
        spec = TrainSpec(epochs=cfg.pretrain_epochs, batch_size=cfg.pretrain_batch_size, lr=cfg.pretrain_lr,
                         seed=cfg.seed, desc="pretrain base")
        with _timed(phases, "pretrain"):
            model.train()
            result = train(model, list(model.parameters()), data, processor.collate, lm_loss, spec)
            model.requires_grad_(False).eval()
        with _timed(phases, "evaluation"):
            heldout = heldout_scores(model, processor, test_rows, train_rows["answer"])
            shifted = styleshift_split(cfg.seed, "test", STYLESHIFT_ROWS)
            styleshift = score_styleshift(model, processor, shifted)

        # A crash never leaves a half-saved base behind; a base of an older recipe is replaced whole.
        with atomic_dir(out) as staging:
            save_base(model, processor, staging)  # the dense checkpoint, before its MLPs are upcycled
            moe_log = None
            if cfg.moe_epochs:
                with _timed(phases, "moe_stage"):
                    test_data = [processor.encode(r["image"], r["question"], r["answer"]) for r in test_rows]
                    moe_log = run_moe_stage(model, processor, data, test_data, cfg, moe)
                with _timed(phases, "moe_evaluation"):
                    moe_log["heldout"] = heldout_scores(model, processor, test_rows, train_rows["answer"])
                    moe_log["styleshift"] = score_styleshift(model, processor, shifted)
                moe_log["config"] = moe.model_dump(include=MOE_RECIPE_FIELDS)
                save_moe_base(model, staging)
            saved = {"path": str(out), "recipe_sha256": recipe, "weights_sha256": weights_sha256(staging),
                     "params_total": sum(p.numel() for p in model.parameters()), "heldout": heldout,
                     "styleshift": styleshift, "moe_stage": moe_log, "phases_s": phases}
            (staging / CARD).write_text(json.dumps({**saved, "config": cfg.model_dump()}, indent=2))
    return BaseBuildResult(**saved, reused=False, train=asdict(result), wall_s=time.perf_counter() - t0)


def heldout_scores(model, processor: VLProcessor, rows, train_answers) -> dict:
    """Caption exact match and attribute recall on held-out images, vs a constant-caption baseline."""
    preds = answer(model, processor, rows["image"], rows["question"], max_new_tokens=32)
    refs = list(rows["answer"])
    # Chance: always say the most frequent training caption (the best constant answer).
    constant = Counter(train_answers).most_common(1)[0][0]

    def recall(pred: str, ref: str) -> float:
        want, got = caption_attributes(ref), caption_attributes(pred)
        return sum(a == b for a, b in zip(want, got)) / max(1, len(want))

    n = len(refs)
    return {
        "n": n,
        "caption_exact": 100 * sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / n,
        "attribute_recall": 100 * sum(recall(p, r) for p, r in zip(preds, refs)) / n,
        "chance_caption_exact": 100 * sum(constant == r for r in refs) / n,
        "chance_attribute_recall": 100 * sum(recall(constant, r) for r in refs) / n,
        "examples": [{"ref": r, "pred": p} for p, r in list(zip(preds, refs))[:5]],
    }
