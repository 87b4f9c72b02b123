"""`bnpipe predict` end to end: click's CliRunner and the real console script in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from bnpipe.cli import cli
from bnpipe.serve.predict import softmax
from tests.test_serve_support import build_model, linear_reference, write_bad_inputs

BNPIPE = str(Path(sys.executable).parent / "bnpipe")  # the venv's console script


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A linear model, a directory of three MNIST-format digits, and a directory of bad files."""
    root = tmp_path_factory.mktemp("cli")
    model = build_model(root / "m.onnx")
    rng = np.random.default_rng(5)
    (root / "good" / "sub").mkdir(parents=True)
    for name in ["b.png", "a.png", "sub/c.png"]:
        img = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        img[[0, -1]] = 0
        Image.fromarray(img).save(root / "good" / name)
    write_bad_inputs(root / "bad")
    return {"root": root, "model": model, "good": root / "good", "bad": root / "bad"}


def expected(path: Path) -> tuple[str, float, np.ndarray]:
    """(label, probability, all probabilities) that the linear model must give the file."""
    probs = softmax(linear_reference(np.asarray(Image.open(path))[None]))[0]
    return str(int(probs.argmax())), float(probs.max()), probs


def invoke(*args: str, stdin: bytes | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, ["predict", *args], input=stdin, catch_exceptions=False)


def test_text_output(files: dict[str, Path]) -> None:
    result = invoke(str(files["good"]), "--model", str(files["model"]))
    assert result.exit_code == 0 and result.stderr == ""
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    good = files["good"]
    assert [line[0] for line in lines] == [str(good / "a.png"), str(good / "b.png"), str(good / "sub" / "c.png")]
    for path, label, prob in lines:
        want_label, want_prob, _ = expected(Path(path))
        assert label == want_label and float(prob) == pytest.approx(want_prob, abs=1e-5)  # 6 decimals printed


def test_json_and_top_k(files: dict[str, Path]) -> None:
    result = invoke(str(files["good"] / "a.png"), "--json", "--top-k", "4", "--model", str(files["model"]))
    assert result.exit_code == 0
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    label, prob, probs = expected(files["good"] / "a.png")
    assert row["path"] == str(files["good"] / "a.png") and row["label"] == label
    assert row["probability"] == pytest.approx(prob, rel=1e-5)
    assert [t["label"] for t in row["top_k"]] == [str(c) for c in np.argsort(-probs, kind="stable")[:4]]
    assert [t["probability"] for t in row["top_k"]] == pytest.approx(list(np.sort(probs)[::-1][:4]), rel=1e-5)


def test_stdin(files: dict[str, Path]) -> None:
    data = (files["good"] / "b.png").read_bytes()
    result = invoke("-", "--model", str(files["model"]), stdin=data)
    label, prob, _ = expected(files["good"] / "b.png")
    name, got_label, got_prob = result.stdout.rstrip("\n").split("\t")
    assert result.exit_code == 0 and (name, got_label) == ("-", label)
    assert float(got_prob) == pytest.approx(prob, abs=1e-5)
    assert invoke("-", "-", "--model", str(files["model"]), stdin=data).exit_code == 2  # stdin is one image


def test_bad_inputs_text_and_json(files: dict[str, Path]) -> None:
    missing = str(files["root"] / "missing.png")
    args = [str(files["good"] / "a.png"), str(files["bad"]), missing, "--model", str(files["model"])]
    text = invoke(*args)
    assert text.exit_code == 1
    assert text.stdout.splitlines()[0].startswith(str(files["good"] / "a.png") + "\t")
    errors = text.stderr.splitlines()
    bad = [str(files["bad"] / name) for name in sorted(p.name for p in files["bad"].iterdir())]
    assert [e.split(": ")[2] for e in errors] == bad + [missing]
    assert all(e.startswith("bnpipe: error: ") for e in errors)
    rows = [json.loads(line) for line in invoke(*args, "--json").stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(files["good"] / "a.png"), *bad, missing]
    assert "label" in rows[0] and all(set(r) == {"path", "error"} for r in rows[1:])


@pytest.mark.parametrize("name", ["empty.png", "notes.png", "truncated.png", "zero.png", "bomb.png", "bomb.bmp"])
def test_each_bad_input_alone(files: dict[str, Path], name: str) -> None:
    phrase = write_bad_inputs(files["root"] / "again")[name]
    result = invoke(str(files["bad"] / name), "--model", str(files["model"]))
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"bnpipe: error: {files['bad'] / name}: ") and phrase in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_unusable_model_and_usage_errors(files: dict[str, Path]) -> None:
    good = str(files["good"] / "a.png")
    missing = invoke(good, "--model", str(files["root"] / "nope.onnx"))
    assert missing.exit_code == 1
    assert missing.stderr == f"bnpipe: error: {files['root'] / 'nope.onnx'}: no such model file\n"
    not_onnx = invoke(good, "--model", good)
    assert not_onnx.exit_code == 1 and "not a usable ONNX model" in not_onnx.stderr
    assert invoke(good, "--model", str(files["model"]), "--device", "tpu").exit_code == 2
    assert invoke(good, "--model", str(files["model"]), "--batch-size", "0").exit_code == 2
    assert invoke("--model", str(files["model"])).exit_code == 2  # no PATH


def test_device_cuda_without_gpu_is_refused(files: dict[str, Path]) -> None:
    from bnpipe.serve.cuda import cuda_device_count

    result = invoke(str(files["good"] / "a.png"), "--model", str(files["model"]), "--device", "cuda", "-v")
    if cuda_device_count() == 0:
        assert result.exit_code == 1 and result.stdout == ""
        assert result.stderr == ("bnpipe: error: --device cuda: no usable GPU "
                                 "(the NVIDIA driver reports no CUDA device)\n")
    else:
        assert result.exit_code == 0 and "runs on CUDAExecutionProvider" in result.stderr


def test_verbose_names_the_provider(files: dict[str, Path]) -> None:
    result = invoke(str(files["good"] / "a.png"), "--model", str(files["model"]), "--device", "cpu", "-v")
    assert result.exit_code == 0 and "runs on CPUExecutionProvider" in result.stderr


def test_console_script_subprocess(files: dict[str, Path]) -> None:
    """The installed `bnpipe`: text, --json, stdin, exit codes, and a bomb refused with one line."""
    model = ["--model", str(files["model"])]
    ok = subprocess.run([BNPIPE, "predict", str(files["good"]), *model], capture_output=True, text=True)
    assert ok.returncode == 0 and len(ok.stdout.splitlines()) == 3 and ok.stderr == ""
    data = (files["good"] / "a.png").read_bytes()
    js = subprocess.run([BNPIPE, "predict", "-", "--json", "--top-k", "2", *model], input=data, capture_output=True)
    row = json.loads(js.stdout)
    assert js.returncode == 0 and row["path"] == "-" and len(row["top_k"]) == 2
    bad = subprocess.run([BNPIPE, "predict", str(files["bad"] / "bomb.png"), str(files["good"] / "a.png"), *model],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and len(bad.stdout.splitlines()) == 1
    assert bad.stderr.startswith(f"bnpipe: error: {files['bad'] / 'bomb.png'}: image too large")
    assert "Warning" not in bad.stderr and "Traceback" not in bad.stderr
    usage = subprocess.run([BNPIPE, "predict", *model], capture_output=True, text=True)
    assert usage.returncode == 2


def test_serve_leaves_pillow_and_warnings_alone_in_a_real_process(files: dict[str, Path]) -> None:
    """Importing serve and reading images changes neither Pillow's limit nor the warning filters,
    and a file past Pillow's warning limit is still refused with one line and no warning."""
    code = (
        "import io, warnings\n"
        "import numpy\n"  # numpy adds filters of its own at import
        "from PIL import Image\n"
        "before = (Image.MAX_IMAGE_PIXELS, list(warnings.filters))\n"
        "from bnpipe.serve import image, predict\n"
        "from tests.test_serve_support import bmp_bytes_with_size\n"
        "try:\n    image.load_digit(bmp_bytes_with_size(10000, 10000), '-')\n"
        "except image.ImageError as e:\n    print(e)\n"
        "print(before == (Image.MAX_IMAGE_PIXELS, list(warnings.filters)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.stderr == "" and out.stdout.splitlines()[1] == "True"
    assert out.stdout.splitlines()[0].startswith("-: image too large, refused before decoding (Image size (100000000")


def test_predict_never_imports_torch_or_onnx(files: dict[str, Path]) -> None:
    code = (
        "import sys\n"
        "from bnpipe.cli import cli\n"
        f"cli(['predict', {str(files['good'])!r}, '--model', {str(files['model'])!r}], standalone_mode=False)\n"
        "heavy = sorted(m for m in sys.modules\n"
        "               if m.split('.')[0] in ('torch', 'onnx', 'torchvision', 'matplotlib', 'tqdm'))\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert len(out.splitlines()) == 4  # three predictions ran
    assert out.splitlines()[-1] == "HEAVY []"
