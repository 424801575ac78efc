"""The MoE base file is a pure function of the model: its bytes are part of the base's identity."""

from __future__ import annotations

from pathlib import Path

from cmoe.config import MoEConfig
from cmoe.model.cmoe_layer import cmoe_layers
from cmoe.model.moe_base import read_layout, save_moe_base
from cmoe.model.surgery import convert_to_cmoe

from .helpers import tiny_llava


def test_saving_the_same_moe_base_again_writes_the_same_bytes(tmp_path: Path) -> None:
    model = convert_to_cmoe(tiny_llava(layers=2), MoEConfig(layers="all", initial_experts=2, top_k=1),
                            single_router=True)
    for layer in cmoe_layers(model).values():
        layer.add_router()
    folders = [tmp_path / str(n) for n in range(16)]
    # safetensors builds fresh hash maps on every save: 16 saves see many map orders, so a writer
    # whose bytes depend on that order passes by chance once in 2^15.
    files = []
    for folder in folders:
        folder.mkdir()
        files.append(save_moe_base(model, folder))
    assert len({f.read_bytes() for f in files}) == 1
    assert read_layout(folders[0]) == {"layers": [0, 1], "initial_experts": 2, "top_k": 1, "aux_loss_coef": 0.01}
