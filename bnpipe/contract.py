"""The ONNX model's interface, shared by `bnpipe export` (writes it) and `bnpipe predict` (checks it).

No torch or onnx here: serve imports it.
"""

from __future__ import annotations

from typing import Any

INPUT_NAME, OUTPUT_NAME = "pixels", "logits"


def input_layout(channels: int = 1, size: int = 28) -> dict[str, Any]:
    """The input's description stored in the ``input_layout`` metadata: raw uint8 pixels, NCHW."""
    return {"name": INPUT_NAME, "dtype": "uint8", "shape": ["batch", channels, size, size], "layout": "NCHW",
            "polarity": "light-on-dark"}
