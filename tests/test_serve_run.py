"""`bnpipe.serve.predict.run`, the whole of `bnpipe predict` as a function: streams, batches, exit status."""

from __future__ import annotations

import io
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bnpipe.errors import BnpipeError
from bnpipe.serve.predict import run
from bnpipe.serve.runtime import Model
from tests.test_serve_predict import write_digits
from tests.test_serve_support import build_model

BNPIPE = str(Path(sys.executable).parent / "bnpipe")  # the venv's console script


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_model(tmp_path_factory.mktemp("m") / "linear.onnx"))


def call(paths: list[str], model: str, **kwargs: Any) -> tuple[int, str, str]:
    """Run with in-memory streams; return (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    status = run(paths, model, "cpu", stdout=out, stderr=err, **kwargs)
    return status, out.getvalue(), err.getvalue()


def test_unconvertible_image_among_good_ones(tmp_path: Path, model: str) -> None:
    """A LAB TIFF gets its one error line; the images around it are still labelled; status 1."""
    paths, _ = write_digits(tmp_path / "d", 4)
    lab = tmp_path / "d" / "002_lab.tif"
    Image.new("RGB", (40, 40), (200, 30, 30)).convert("LAB").save(lab)
    status, out, err = call([str(tmp_path / "d")], model, batch_size=2)
    assert status == 1
    assert [line.split("\t")[0] for line in out.splitlines()] == paths
    assert err == f"bnpipe: error: {lab}: unsupported image mode LAB (conversion from LAB to RGB not supported)\n"
    json_status, json_out, _ = call([str(tmp_path / "d")], model, as_json=True)
    assert json_status == 1 and '"error": "unsupported image mode LAB' in json_out.splitlines()[3]


@pytest.mark.parametrize("n,batch_size", [(10, 1), (10, 3), (10, 10), (10, 64)])
def test_one_session_run_per_batch(tmp_path: Path, model: str, monkeypatch: pytest.MonkeyPatch,
                                   n: int, batch_size: int) -> None:
    calls: list[int] = []
    load = Model.load

    def counted(cls: type, *args: Any, **kwargs: Any) -> Model:
        loaded = load(*args, **kwargs)
        # the CPU path, and the CUDA path; a small batch runs on the one-thread session
        for session in filter(None, (loaded.session, loaded.small)):
            for name in ("run", "run_with_iobinding"):
                real = getattr(session, name)
                setattr(session, name, lambda *a, _real=real, **k: (calls.append(1), _real(*a, **k))[1])
        return loaded

    monkeypatch.setattr(Model, "load", classmethod(counted))
    write_digits(tmp_path, n)
    status, out, _ = call([str(tmp_path)], model, batch_size=batch_size, workers=0)
    assert status == 0 and len(out.splitlines()) == n
    assert len(calls) == math.ceil(n / batch_size)


def test_stdin_and_verbose(tmp_path: Path, model: str) -> None:
    paths, _ = write_digits(tmp_path, 1)
    out, err = io.StringIO(), io.StringIO()
    data = io.BytesIO(Path(paths[0]).read_bytes())
    assert run(["-"], model, "cpu", verbose=True, stdin=data, stdout=out, stderr=err) == 0
    assert out.getvalue().startswith("-\t") and err.getvalue() == f"bnpipe: {model} runs on CPUExecutionProvider\n"


def test_unusable_model_raises(tmp_path: Path) -> None:
    paths, _ = write_digits(tmp_path, 1)
    with pytest.raises(BnpipeError, match="no such model file"):
        call(paths, str(tmp_path / "nope.onnx"))


def test_unwritable_stdout_is_one_error(tmp_path: Path, model: str) -> None:
    paths, _ = write_digits(tmp_path / "d", 3)
    with open("/dev/full", "w") as full, pytest.raises(BnpipeError, match="^cannot write output: No space left"):
        run(paths, model, "cpu", stdout=full, stderr=io.StringIO())
    with open("/dev/full", "w") as full:
        done = subprocess.run([BNPIPE, "predict", str(tmp_path / "d"), "--model", model], stdout=full,
                              stderr=subprocess.PIPE, text=True)
    assert done.returncode == 1
    assert done.stderr == "bnpipe: error: cannot write output: No space left on device\n"


def test_reader_gone_is_quiet(tmp_path: Path, model: str) -> None:
    """`bnpipe predict DIR | head -0`: the pipe is closed before the first write; no traceback, status 1."""
    write_digits(tmp_path, 3)
    proc = subprocess.Popen([BNPIPE, "predict", str(tmp_path), "--model", model], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the model has loaded
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 1 and err == b""


def test_results_equal_the_batched_arrays(tmp_path: Path, model: str) -> None:
    """Text and JSON give the same labels; every probability is in (0, 1]."""
    write_digits(tmp_path, 5, seed=3)
    status, text, _ = call([str(tmp_path)], model)
    json_status, js, _ = call([str(tmp_path)], model, as_json=True, top_k=2)
    import json

    rows = [json.loads(line) for line in js.splitlines()]
    assert status == json_status == 0
    assert [line.split("\t")[1] for line in text.splitlines()] == [r["label"] for r in rows]
    assert all(0 < r["probability"] <= 1 and len(r["top_k"]) == 2 for r in rows)
    assert np.allclose([float(line.split("\t")[2]) for line in text.splitlines()],
                       [r["probability"] for r in rows], atol=1e-6)
