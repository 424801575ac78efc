"""Byte-level BPE tokenizer trained locally, so any UTF-8 text tokenizes with no unknown token."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, IMAGE = "<pad>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IMAGE]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` tokens (256 bytes + specials + merges) on `texts`."""
    tok = Tokenizer(models.BPE())
    # Byte-level pre-tokenisation maps every UTF-8 byte to a symbol, so nothing is ever <unk>.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Sorted input makes the learned merges independent of the corpus' iteration order.
    tok.train_from_iterator(sorted(set(texts)), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE},
    )
