"""`json_line` writes by hand what `json.dumps` writes: checked against `json.dumps` itself."""

from __future__ import annotations

import json

import numpy as np

from bnpipe.serve.output import json_line
from bnpipe.serve.predict import Prediction

AWKWARD = ['plain.png', 'quote".png', "back\\slash.png", "tab\t.png", "ctl\x01.png", "ü.png", "line\u2028sep.png",
           "emoji\U0001F600.png"]
NUMBERS = [0.5, 1.0, 1e-20, np.float64(1e-20), np.float32(0.25).item(), 0.999990123456789, float("nan")]


def test_prediction_lines_equal_json_dumps() -> None:
    for path in AWKWARD:
        for number in NUMBERS:
            p = Prediction(path, label="7", probability=number, top_k=[("7", number), ('"', 0.125)])
            expected = {"path": path, "label": "7", "probability": number,
                        "top_k": [{"label": "7", "probability": number}, {"label": '"', "probability": 0.125}]}
            assert json_line(p) == json.dumps(expected), (path, number)


def test_error_lines_equal_json_dumps() -> None:
    for path in AWKWARD:
        p = Prediction(path, error=f"not an image: {path}")
        assert json_line(p) == json.dumps({"path": path, "error": f"not an image: {path}"}), path
