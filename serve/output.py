"""How predictions and errors are written: tab-separated lines, JSON Lines, one-line reasons."""

from __future__ import annotations

import json
from collections.abc import Iterable
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


def json_line(p: Prediction) -> str:
    """Format one prediction as a JSON object on one line.

    ``{"path", "label", "probability", "top_k": [{"label", "probability"}...]}``, or
    ``{"path", "error"}`` for an input that failed.
    """
    if p.error is not None:
        return json.dumps({"path": p.path, "error": p.error})
    return json.dumps({"path": p.path, "label": p.label, "probability": p.probability,
                       "top_k": [{"label": label, "probability": prob} for label, prob in p.top_k]})
