"""Inputs a user gets wrong: each is one clear error line (or a documented acceptance), never a traceback.

Config values that cannot work, a folder or binary file as `--config`, and `cmoe predict`'s own inputs.
The bundle's own bad inputs (task.yaml, Parquet, JSON, S3 layout) are in tests/data/test_bad_bundles.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cmoe.cli import app
from cmoe.config import ConfigError, load_config

runner = CliRunner()

# Values that cannot work, each with the dotted field the error must name.
IMPOSSIBLE = {
    "expand.batch_size: 0": ("expand:\n  batch_size: 0\n", "expand.batch_size"),
    "expand.batch_size: -1": ("expand:\n  batch_size: -1\n", "expand.batch_size"),
    "probe.batch_size: 0": ("probe:\n  batch_size: 0\n", "probe.batch_size"),
    "eval.batch_size: 0": ("eval:\n  batch_size: 0\n", "eval.batch_size"),
    "expand.lr: -1": ("expand:\n  lr: -1\n", "expand.lr"),
    "probe.lr: 0": ("probe:\n  lr: 0\n", "probe.lr"),
    "locator.lr: -1": ("locator:\n  lr: -1\n", "locator.lr"),
    "base.patch_size: 0": ("base:\n  patch_size: 0\n", "base.patch_size"),
    "base.image_size: 0": ("base:\n  image_size: 0\n", "base.image_size"),
    "base.patch_size > image_size": ("base:\n  patch_size: 128\n", "base: Value error, patch_size=128"),
    "base.text_heads not dividing": ("base:\n  text_heads: 3\n", "base: Value error, text_hidden=128"),
    "base.dtype: float16": ("base:\n  dtype: float16\n", "base.dtype"),
    "base.attn_implementation: flash in fp32": ("base:\n  attn_implementation: flash_attention_2\n",
                                                "base: Value error, attn_implementation flash_attention_2"),
    "locator.epochs: -5": ("locator:\n  epochs: -5\n", "locator.epochs"),
    "eval.max_new_tokens: -1": ("eval:\n  max_new_tokens: -1\n", "eval.max_new_tokens"),
    "gate.max_forgetting: 500": ("gate:\n  max_forgetting: 500\n", "gate.max_forgetting"),
    "gate.min_new_task_acc: 500": ("gate:\n  min_new_task_acc: 500\n", "gate.min_new_task_acc"),
    "gate.min_locator_acc: -1": ("gate:\n  min_locator_acc: -1\n", "gate.min_locator_acc"),
}


@pytest.mark.parametrize("case", sorted(IMPOSSIBLE))
def test_a_config_value_that_cannot_work_is_refused_at_load_naming_the_field(case: str, tmp_path: Path) -> None:
    text, field = IMPOSSIBLE[case]
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("(", r"\(")):
        load_config(config)


def test_doctor_refuses_an_impossible_value_with_exit_2_and_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("expand:\n  batch_size: 0\n")
    result = runner.invoke(app, ["doctor", "--config", str(config)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.exception
    assert result.stderr.splitlines() == [f"error: {config}: expand.batch_size: Input should be greater than or "
                                          "equal to 1"]


def test_the_defaults_and_the_tiny_test_config_still_load(tmp_path: Path) -> None:
    from cmoe.config import CmoeConfig, tiny_test_config

    assert CmoeConfig().expand.batch_size >= 1
    assert tiny_test_config(tmp_path).eval.max_new_tokens >= 1


@pytest.mark.parametrize("kind", ["folder", "binary", "fifo"])
def test_a_config_path_that_is_no_yaml_file_is_one_error_line(kind: str, tmp_path: Path) -> None:
    import os

    path = tmp_path / "cfg"
    if kind == "folder":
        path.mkdir()
        reason = "is a folder, not a config file"
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe\x00\x81 not text")
        reason = "not UTF-8 text"
    else:
        os.mkfifo(path)  # reading it would block forever
        reason = "not a regular file"
    result = runner.invoke(app, ["doctor", "--config", str(path)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {reason}"), result.stderr
    assert "Traceback" not in result.output


# ------------------------------------------------------------------ cmoe predict's inputs
def _predict(tmp_path: Path, image: Path, question: str = "what color is it?"):  # noqa: ANN202
    config = tmp_path / "cfg.yaml"
    config.write_text(f"home: {tmp_path / 'home'}\n")
    return runner.invoke(app, ["predict", "--image", str(image), "--question", question, "--config", str(config)])


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case", ["fifo", "text", "eps", "bomb-header", "12000x12000", "5000x5000",
                                  "16-bit"])
def test_predict_refuses_an_image_the_validator_would_refuse_before_decoding_it(case: str, tmp_path: Path) -> None:
    import os
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from data.helpers import header_only_png

    image = tmp_path / f"{case}.png"
    if case == "fifo":
        os.mkfifo(image)  # nothing ever writes: reading it would hang
        reason = "not a regular file"
    elif case == "text":
        image.write_text("not an image\n")
        reason = "not an image in a supported format"
    elif case == "eps":
        image = tmp_path / "x.eps"
        image.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
        reason = "not an image in a supported format"  # never handed to Ghostscript
    elif case == "bomb-header":
        image.write_bytes(header_only_png(60000, 60000))
        reason = "possible decompression bomb"
    elif case == "12000x12000":  # 140 KB on disk, 3.8 GB once decoded
        image.write_bytes(header_only_png(12000, 12000))
        reason = "possible decompression bomb"
    elif case == "5000x5000":
        image.write_bytes(header_only_png(5000, 5000))
        reason = "over the 16777216 px limit"
    else:
        image.write_bytes(_png(8, 8, "I;16"))
        reason = "more than 8 bits per channel"
    result = _predict(tmp_path, image)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --image {image}: ") and reason in lines[0], lines
    assert "Traceback" not in result.output


def test_predict_refuses_a_question_over_the_text_limit(tmp_path: Path) -> None:
    image = tmp_path / "ok.png"
    image.write_bytes(_png(8, 8))
    result = _predict(tmp_path, image, "why " * 25_000)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["error: --question: the question is 100000 characters, over the 2000 limit"]
