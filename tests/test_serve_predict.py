"""Batch prediction (bnpipe.serve.predict): inputs, order, batching, workers, and equality with references."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bnpipe.serve import predict as predict_module
from bnpipe.serve import runtime
from bnpipe.serve.image import load_digit
from bnpipe.serve.inputs import expand_inputs
from bnpipe.serve.predict import decode_batch, decode_batches, decoding_pool, default_workers, predict, rank, softmax
from bnpipe.serve.runtime import Model, intra_op_threads, usable_cpus
from tests.test_serve_support import build_model, linear_reference, write_bad_inputs

BNPIPE = str(Path(sys.executable).parent / "bnpipe")  # the venv's console script


@pytest.fixture(scope="module")
def linear(tmp_path_factory: pytest.TempPathFactory) -> Model:
    return Model.load(str(build_model(tmp_path_factory.mktemp("m") / "linear.onnx")), "cpu")


def write_digits(directory: Path, n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """n random 28x28 dark-background images (they pass through preprocessing unchanged)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    pixels[:, [0, -1], :] = 0  # a dark border: MNIST format
    pixels[:, :, [0, -1]] = 0
    paths = []
    for i, img in enumerate(pixels):
        paths.append(str(directory / f"{i:03d}.png"))
        Image.fromarray(img).save(paths[-1])
    return paths, pixels


def flatten(batches):  # type: ignore[no-untyped-def]
    return [p for batch in batches for p in batch]


def test_expand_inputs_order_and_recursion(tmp_path: Path) -> None:
    for rel in ["b/2.png", "b/10.png", "a.png", "b/sub/1.png", "b/.hidden.png", "b/.git/x.png", "c/z.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    items = expand_inputs([str(tmp_path / "b"), "-", str(tmp_path / "a.png"), str(tmp_path / "nope.png"),
                           str(tmp_path / "empty")], stdin=b"data")
    names = [Path(i.name).relative_to(tmp_path).as_posix() if i.name != "-" else "-" for i in items]
    assert names == ["b/10.png", "b/2.png", "b/sub/1.png", "-", "a.png", "nope.png", "empty"]
    assert items[3].source == b"data"
    assert [i.error for i in items][-2:] == ["no such file or directory", "directory holds no files"]


def test_softmax_and_rank() -> None:
    logits = np.array([[0.0, 1.0, 3.0], [1000.0, 1000.0, -5.0]], np.float32)
    probs = softmax(logits)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    np.testing.assert_allclose(probs[0], np.exp([0, 1, 3]) / np.exp([0, 1, 3]).sum())
    assert np.isfinite(probs).all()  # no overflow at 1000
    ranked = rank(probs, ["a", "b", "c"], 2)
    assert [lab for lab, _ in ranked[0]] == ["c", "b"]
    assert [lab for lab, _ in ranked[1]] == ["a", "b"]  # a tie keeps class order
    assert len(rank(probs, ["a", "b", "c"], 10)[0]) == 3  # k is capped at the number of classes


@pytest.mark.parametrize("batch_size", [1, 4, 256])
def test_predictions_equal_reference_in_input_order(tmp_path: Path, linear: Model, batch_size: int) -> None:
    paths, pixels = write_digits(tmp_path / "d", 10)
    bad = write_bad_inputs(tmp_path / "bad")
    # bad inputs interleaved with good ones, across batch boundaries
    order = [paths[0], str(tmp_path / "bad" / "empty.png"), *paths[1:5], str(tmp_path / "bad" / "bomb.png"),
             str(tmp_path / "missing.png"), *paths[5:]]
    preds = flatten(predict(linear, decode_batches(expand_inputs(order), batch_size), top_k=10))
    assert [p.path for p in preds] == order
    good = [p for p in preds if p.error is None]
    assert len(good) == 10
    assert preds[1].error == "empty file" and bad["bomb.png"] in preds[6].error
    assert preds[7].error == "no such file or directory"
    probs = softmax(linear_reference(pixels))
    for p, row in zip(good, probs):
        assert p.label == str(int(row.argmax())) and p.probability == pytest.approx(float(row.max()), rel=1e-5)
        assert [lab for lab, _ in p.top_k] == [str(c) for c in np.argsort(-row, kind="stable")]
        assert sum(prob for _, prob in p.top_k) == pytest.approx(1.0)


def test_every_bad_input_in_a_directory(tmp_path: Path, linear: Model) -> None:
    expected = write_bad_inputs(tmp_path / "mixed")
    paths, _ = write_digits(tmp_path / "mixed", 3)
    preds = flatten(predict(linear, decode_batches(expand_inputs([str(tmp_path / "mixed")]), 2)))
    assert len(preds) == len(expected) + 3
    for p in preds:
        name = Path(p.path).name
        if name in expected:
            assert p.error is not None and expected[name] in p.error and p.label is None
        else:
            assert p.error is None and p.label is not None


def test_worker_pool_gives_the_same_results(tmp_path: Path) -> None:
    """Decode processes change nothing in the output (run as the CLI runs it: pool before model)."""
    model = build_model(tmp_path / "m.onnx")
    write_digits(tmp_path / "d", 12)
    bad = write_bad_inputs(tmp_path / "d")
    command = [BNPIPE, "predict", str(tmp_path / "d"), "--model", str(model), "--json", "--batch-size", "3"]
    runs = [subprocess.run([*command, "--workers", w], capture_output=True, text=True) for w in ("0", "1", "2")]
    assert [r.returncode for r in runs] == [1, 1, 1]  # the bad files
    assert runs[0].stdout == runs[1].stdout == runs[2].stdout and len(runs[0].stdout.splitlines()) == 12 + len(bad)


def test_no_pool_for_small_jobs() -> None:
    with decoding_pool(10) as pool:
        assert pool is None


def test_default_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_workers(10) == 0  # a pool would cost more than it saves
    assert usable_cpus() == len(os.sched_getaffinity(0)) >= 1
    for cpus, workers, threads in ((1, 0, 1), (2, 0, 2), (8, 4, 4), (16, 8, 4)):  # measured: no gain on 2 CPUs
        monkeypatch.setattr(predict_module, "usable_cpus", lambda: cpus)
        monkeypatch.setattr(runtime, "usable_cpus", lambda: cpus)
        assert (default_workers(10_000), intra_op_threads()) == (workers, threads)


def test_decode_batch_stacks_good_and_keeps_errors(tmp_path: Path) -> None:
    paths, pixels = write_digits(tmp_path, 2)
    items = expand_inputs([paths[0], str(tmp_path / "x.png"), paths[1]])
    stacked, errors = decode_batch(items)
    assert stacked.shape == (2, 28, 28) and stacked.dtype == np.uint8
    assert np.array_equal(stacked, pixels) and errors == {1: "no such file or directory"}
    assert np.array_equal(load_digit(paths[0], "x"), pixels[0])
