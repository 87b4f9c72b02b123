"""``POST /v1/predict``: one image file in, the JSON line that ``bnpipe predict --json`` writes out.

The image is the whole body, or the multipart field ``file``. It is decoded and preprocessed by
`bnpipe.serve.image.load_digit` in a thread (a large photo takes milliseconds), then runs
through the batcher with the V2 requests. ``?top_k=N`` as ``--top-k``; ``?image=1`` adds
``"input"``: the 28x28 uint8 image the model saw, as rows of pixel values (for the page).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from bnpipe.serve.image import ImageError, load_digit
from bnpipe.serve.bodies import decimal
from bnpipe.serve.inputs import STDIN  # predict's name for an image without a file name
from bnpipe.serve.output import json_line
from bnpipe.serve.predict import Prediction, rank, softmax
from bnpipe.serve.v2 import V2Error

# The multipart parser logs each fault in a client's body as a warning on stderr; the 400 already says it.
logging.getLogger("python_multipart").setLevel(logging.ERROR)


def _query_int(request: Request, key: str, default: int, low: int) -> int:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    value = decimal(raw)
    if value is None or value < low:
        raise V2Error(f"query parameter {key}={raw[:40]!r}: expected an integer >= {low}")
    return value


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def image_bytes(request: Request, body: bytes) -> tuple[bytes, str]:
    """The image and its name: the multipart field ``file`` (named by its filename), or the body."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        return body, STDIN
    from starlette.formparsers import MultiPartException, MultiPartParser


    try:
        form = await MultiPartParser(request.headers, _once(body), max_files=1, max_fields=8).parse()
    except MultiPartException as exc:
        raise V2Error(f"bad multipart body: {exc.message}") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise V2Error("the multipart body has no file field 'file'")
    try:
        return await upload.read(), upload.filename or STDIN
    finally:
        await form.close()


async def predict_image(request: Request, body: bytes, infer: Callable[[np.ndarray], Awaitable[np.ndarray]],
                        labels: Sequence[str]) -> tuple[int, bytes]:
    """Label one image.

    Args:
        request: For its headers and query (``top_k``, ``image``).
        body: The request body, already read within the size limit.
        infer: Runs [n, 1, 28, 28] uint8 rows and returns their logits [n, classes].
        labels: The model's class labels.

    Returns:
        (status, JSON body): 200 and the prediction, or 400 and ``{"path", "error"}`` for an image
        that cannot be used: the line ``bnpipe predict --json`` writes, plus ``"input"`` (the
        [28, 28] pixels the model saw) when ``image`` is set.
    """
    top_k = _query_int(request, "top_k", 3, 1)
    with_image = _query_int(request, "image", 0, 0) > 0
    data, name = await image_bytes(request, body)
    try:
        digit = await run_in_threadpool(load_digit, data, name)  # [28, 28] uint8
    except ImageError as exc:
        return 400, json_line(Prediction(name, error=exc.reason)).encode()
    logits = await infer(digit[None, None])  # [1, 1, 28, 28] -> [1, classes]
    top = rank(softmax(logits), labels, top_k)[0]
    answer = json_line(Prediction(name, top[0][0], top[0][1], top))
    if with_image:  # one more key at the end of the object, as json.dumps of the dict would write it
        answer = f'{answer[:-1]}, "input": {json.dumps(digit.tolist())}}}'
    return 200, answer.encode()
