"""How predictions and errors are written: tab-separated lines, JSON Lines, one-line reasons."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from json.encoder import encode_basestring_ascii as _string  # json.dumps' own escaping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # predict imports this module: a run-time import would be circular
    from bnpipe.serve.predict import Prediction


def text_lines(predictions: Iterable[Prediction]) -> tuple[list[str], list[str]]:
    """Format predictions as ``path<TAB>label<TAB>probability`` lines.

    Returns:
        (stdout lines, stderr lines); a failed input becomes ``bnpipe: error: <path>: <why>``
        on stderr. Lines carry no newline.
    """
    out: list[str] = []
    err: list[str] = []
    for p in predictions:
        if p.error is None:
            out.append(f"{p.path}\t{p.label}\t{p.probability:.6f}")
        else:
            err.append(f"bnpipe: error: {p.path}: {p.error}")
    return out, err


def _number(x: float) -> str:
    """A number as `json.dumps` writes it (a finite float is its repr: `float.__repr__` for numpy's too)."""
    return float.__repr__(x) if isinstance(x, float) and math.isfinite(x) else json.dumps(x)


def json_line(p: Prediction) -> str:
    """Format one prediction as a JSON object on one line.

    ``{"path", "label", "probability", "top_k": [{"label", "probability"}...]}``, or
    ``{"path", "error"}`` for an input that failed. The text is exactly what `json.dumps` of
    those dicts writes, put together directly: the strings escaped by json's own encoder, the
    floats by repr, at a third of the cost.
    """
    if p.error is not None:
        return f'{{"path": {_string(p.path)}, "error": {_string(p.error)}}}'
    top = ", ".join([f'{{"label": {_string(label)}, "probability": {_number(prob)}}}' for label, prob in p.top_k])
    return (f'{{"path": {_string(p.path)}, "label": {_string(p.label)}, "probability": {_number(p.probability)}, '
            f'"top_k": [{top}]}}')
