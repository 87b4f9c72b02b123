"""Helpers for the serve tests (no tests here): tiny ONNX models that keep the export contract,
synthetic digit images, and image files of every kind, good and bad.

The models are built with `onnx.helper` so that serve can be tested before, and apart from,
the real exporter; they carry the same input/output names, dtypes and metadata.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

LAYOUT = {"name": "pixels", "dtype": "uint8", "shape": ["batch", 1, 28, 28], "layout": "NCHW",
          "polarity": "light-on-dark"}
LABELS = [str(i) for i in range(10)]


def linear_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """W [784, 10] and b [10] of the linear test model."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((784, 10)) * 0.05).astype(np.float32), rng.standard_normal(10).astype(np.float32)


def linear_reference(pixels: np.ndarray, seed: int = 0) -> np.ndarray:
    """What the linear model computes, in numpy: pixels [N, 28, 28] uint8 -> logits [N, 10]."""
    w, b = linear_weights(seed)
    x = (pixels.reshape(len(pixels), 784).astype(np.float32) / 255.0 - 0.5) / 0.5
    return x @ w + b


def build_model(path: Path, kind: str = "linear", seed: int = 0, input_name: str = "pixels",
                input_type: int | None = None, input_shape: list[Any] | None = None,
                metadata: dict[str, str] | None = None, drop_metadata: tuple[str, ...] = ()) -> Path:
    """Write a small valid ONNX model that keeps (or, through the overrides, breaks) the contract.

    kind "linear": Cast, normalize, Reshape [N, 784], MatMul, Add (reference: `linear_reference`).
    kind "conv": the BN conv net's shape with random weights: Conv 6@3x3 pad 1, Relu, MaxPool,
    Conv 16@5x5, Relu, MaxPool, Flatten, Gemm -> 10 (exercises cuDNN on a GPU).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    init = [numpy_helper.from_array(np.array(255.0, np.float32), "s255"),
            numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [helper.make_node("Cast", [input_name], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Div", ["f", "s255"], ["u"]), helper.make_node("Sub", ["u", "half"], ["c"]),
             helper.make_node("Div", ["c", "half"], ["x"])]  # x = (pixels / 255 - 0.5) / 0.5
    if kind == "linear":
        w, b = linear_weights(seed)
        init += [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B"),
                 numpy_helper.from_array(np.array([-1, 784], np.int64), "flat_shape")]
        nodes += [helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
                  helper.make_node("MatMul", ["flat", "W"], ["mm"]), helper.make_node("Add", ["mm", "B"], ["logits"])]
    else:
        def weight(name: str, *shape: int) -> None:
            scaled = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))  # unit-variance activations
            init.append(numpy_helper.from_array(scaled.astype(np.float32), name))

        weight("c1", 6, 1, 3, 3), weight("c2", 16, 6, 5, 5), weight("fc", 10, 400)
        init.append(numpy_helper.from_array(rng.standard_normal(10).astype(np.float32) * 0.1, "fcb"))
        nodes += [helper.make_node("Conv", ["x", "c1"], ["y1"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["y1"], ["r1"]),
                  helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
                  helper.make_node("Conv", ["p1", "c2"], ["y2"]), helper.make_node("Relu", ["y2"], ["r2"]),
                  helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
                  helper.make_node("Flatten", ["p2"], ["fl"], axis=1),
                  helper.make_node("Gemm", ["fl", "fc", "fcb"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "serve_test", [helper.make_tensor_value_info(input_name, input_type or TensorProto.UINT8,
                                                            input_shape or ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # onnxruntime 1.31 reads IR versions up to 13
    meta = {"bnpipe_version": "0.1.0", "labels": json.dumps(LABELS), "input_layout": json.dumps(LAYOUT),
            "preprocessing": json.dumps({"mode": "half", "mean": [0.5], "std": [0.5]}), "bn_folded": "true",
            "source_checkpoint_sha256": "0" * 64, "checkpoint_test_acc": "0.1"}
    meta.update(metadata or {})
    for key in drop_metadata:
        meta.pop(key)
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def stroke_digit(size: int = 200, seed: int = 0) -> np.ndarray:
    """A digit-like drawing: a thick anti-aliased "7"-ish polyline, dark on white, [size, size] uint8."""
    rng = np.random.default_rng(seed)
    big = Image.new("L", (size * 4, size * 4), 255)  # drawn 4x larger, then reduced: anti-aliased edges
    s = size * 4 / 200
    jitter = rng.uniform(-6, 6, size=(4, 2))
    points = [((50 + jitter[0, 0]) * s, (45 + jitter[0, 1]) * s), ((150 + jitter[1, 0]) * s, (50 + jitter[1, 1]) * s),
              ((95 + jitter[2, 0]) * s, (160 + jitter[2, 1]) * s)]
    draw = ImageDraw.Draw(big)
    draw.line(points, fill=0, width=int(18 * s), joint="curve")
    draw.line([((75 + jitter[3, 0]) * s, 105 * s), ((135 + jitter[3, 1]) * s, 105 * s)], fill=0, width=int(14 * s))
    return np.asarray(big.reduce(4))


def png_bytes_with_size(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` but that holds almost no data.

    A decompression bomb in miniature: only the header says it is huge.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bmp_bytes_with_size(width: int, height: int) -> bytes:
    """An 8-bit BMP whose header declares ``width`` x ``height``, with almost no pixel data.

    Unlike PNG (which serve opens with Pillow's PNG reader directly), a BMP goes through
    `Image.open` and so meets Pillow's own decompression-bomb check.
    """
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 0, 0, 2835, 2835, 0, 0)  # BITMAPINFOHEADER
    offset = 14 + len(info) + 1024  # file header, info header, 256-colour palette
    return b"BM" + struct.pack("<IHHI", offset + 16, 0, 0, offset) + info + bytes(1024) + bytes(16)


def write_bad_inputs(directory: Path) -> dict[str, str]:
    """Write one file of each bad kind into ``directory``.

    Returns:
        {file name: a phrase its error message must contain}.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "empty.png").write_bytes(b"")
    (directory / "notes.png").write_text("not an image at all\n")
    good = directory / "_full.png"
    Image.fromarray(stroke_digit(64)).save(good)
    data = good.read_bytes()
    good.unlink()
    (directory / "truncated.png").write_bytes(data[: len(data) // 2])
    (directory / "zero.png").write_bytes(png_bytes_with_size(0, 10))
    (directory / "bomb.png").write_bytes(png_bytes_with_size(100_000, 100_000))
    (directory / "bomb.bmp").write_bytes(bmp_bytes_with_size(60_000, 60_000))
    return {"empty.png": "empty file", "notes.png": "not an image", "truncated.png": "truncated",
            "zero.png": "zero size", "bomb.png": "too large", "bomb.bmp": "too large"}
