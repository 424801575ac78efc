"""A task's training rows are encoded when first read, once, exactly as an eager encoding would be."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from cmoe.config import CmoeConfig
from cmoe.data.guard import training_scope
from cmoe.data.loading import load_split
from cmoe.data.validate import ValidatedBundle
from cmoe.stages.common import load_train, open_lineage


@pytest.fixture
def counted(make_cfg: Callable[..., CmoeConfig], suite: list[ValidatedBundle], monkeypatch: pytest.MonkeyPatch):
    """(the first task's TaskData, the processor, a list of the encode calls made so far)."""
    model, processor = open_lineage(make_cfg(), None)
    calls: list[str] = []
    encode = processor.encode

    def counting(image, question, answer=None):  # noqa: ANN001, ANN202 - the processor's own signature
        calls.append(question)
        return encode(image, question, answer)

    monkeypatch.setattr(processor, "encode", counting)
    return load_train(make_cfg(), suite[0], model, processor), processor, calls


def test_loading_a_task_encodes_no_row_until_one_is_read(counted) -> None:  # noqa: ANN001
    data, _, calls = counted
    held = data.encoded.select([5, 2])
    assert len(data.encoded) > 5 and len(held) == 2 and calls == []
    _ = held[0]
    assert len(calls) == 1


def test_a_row_read_through_a_selection_and_directly_is_encoded_once(counted) -> None:  # noqa: ANN001
    data, _, calls = counted
    first = data.encoded.select([5, 2])[0]
    assert data.encoded[5] is first and len(calls) == 1


def test_a_lazily_encoded_row_equals_the_eager_encoding(counted, suite: list[ValidatedBundle],  # noqa: ANN001
                                                         make_cfg: Callable[..., CmoeConfig]) -> None:
    data, processor, _ = counted
    bundle = suite[0]
    with training_scope(bundle, {}):
        row = load_split(bundle, "train", cache_dir=make_cfg().home / "cache")[3]
    template = bundle.spec.instruction or "{question}"
    eager = processor.encode(row["image"], template.format(question=row["question"]), row["answer"])
    lazy = data.encoded[3]
    assert torch.equal(lazy.input_ids, eager.input_ids) and torch.equal(lazy.labels, eager.labels)
    assert all(torch.equal(lazy.images[k], eager.images[k]) for k in eager.images)
