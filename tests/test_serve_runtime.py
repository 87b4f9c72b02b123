"""The onnxruntime side (bnpipe.serve.runtime, bnpipe.serve.cuda): providers, model contract, loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bnpipe.errors import BnpipeError
from bnpipe.serve import cuda
from bnpipe.serve.runtime import (CPU, CUDA, PARALLEL_ROWS, FixedRows, Model, check_contract, plan_providers,
                                  provider_that_ran)
from tests.test_serve_support import LABELS, LAYOUT, build_model, linear_reference

ALL = ["TensorrtExecutionProvider", CUDA, CPU]
GOOD_IN = [("pixels", "tensor(uint8)", ["batch", 1, 28, 28])]
GOOD_OUT = [("logits", "tensor(float)", ["batch", 10])]
GOOD_META = {"labels": json.dumps(LABELS), "input_layout": json.dumps(LAYOUT)}


# --- which provider ---------------------------------------------------------------------------

def test_auto_takes_cuda_only_with_a_gpu() -> None:
    assert plan_providers("auto", ALL, gpu_count=1) == [CUDA, CPU]
    assert plan_providers("auto", ALL, gpu_count=0) == [CPU]
    assert plan_providers("auto", [CPU], gpu_count=2) == [CPU]  # the CPU-only onnxruntime build


def test_cpu_never_asks_for_cuda() -> None:
    assert plan_providers("cpu", ALL, gpu_count=1) == [CPU]


def test_cuda_without_gpu_or_provider_is_an_error() -> None:
    assert plan_providers("cuda", ALL, gpu_count=1) == [CUDA, CPU]
    with pytest.raises(BnpipeError, match="no usable GPU"):
        plan_providers("cuda", ALL, gpu_count=0)
    with pytest.raises(BnpipeError, match="no CUDA execution provider"):
        plan_providers("cuda", [CPU], gpu_count=1)


def test_the_session_decides_what_ran() -> None:
    assert provider_that_ran("auto", [CUDA, CPU]) == CUDA
    assert provider_that_ran("auto", [CPU]) == CPU  # CUDA failed to start: auto may fall back
    assert provider_that_ran("cuda", [CUDA, CPU]) == CUDA
    with pytest.raises(BnpipeError, match="failed to start"):
        provider_that_ran("cuda", [CPU])  # cuda never quietly falls back


def test_device_cuda_on_this_machine(tmp_path: Path) -> None:
    """--device cuda errors exactly when the driver reports no GPU; with one, CUDA really runs."""
    model = build_model(tmp_path / "m.onnx", kind="conv")
    if cuda.cuda_device_count() == 0:
        with pytest.raises(BnpipeError, match="--device cuda: no usable GPU"):
            Model.load(str(model), "cuda")
        assert Model.load(str(model), "auto").provider == CPU
    else:
        assert Model.load(str(model), "cuda").provider == CUDA


def test_session_falls_back_silently_and_we_notice(tmp_path: Path) -> None:
    """Real onnxruntime: asked for CUDA where it cannot start, it runs on the CPU without a word.

    Only `provider_that_ran` on `session.get_providers()` can catch it (run in a subprocess:
    the preloaded CUDA libraries stay in the process).
    """
    model = build_model(tmp_path / "m.onnx", kind="conv")
    code = (
        "import onnxruntime as ort\n"
        "from bnpipe.serve import cuda\n"
        "from bnpipe.serve.runtime import provider_that_ran\n"
        "from bnpipe.errors import BnpipeError\n"
        "cuda.preload_cuda_libraries(); ort.set_default_logger_severity(4)\n"
        f"s = ort.InferenceSession({str(model)!r}, providers=['CUDAExecutionProvider', 'CPUExecutionProvider'])\n"
        "print(s.get_providers()[0])\n"
        "try:\n    print(provider_that_ran('cuda', s.get_providers()))\n"
        "except BnpipeError as e:\n    print('refused', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    if cuda.cuda_device_count() == 0:
        assert out[0] == CPU and out[1].startswith("refused --device cuda: the CUDA execution provider failed to start")
    else:
        assert out[0] == CUDA and out[1] == CUDA


# --- CUDA libraries from the nvidia-* wheels ------------------------------------------------------

def test_finds_cuda13_wheel_layout(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    for rel in ["nvidia/cu13/lib/libcudart.so.13", "nvidia/cu13/lib/libcublas.so.13",
                "nvidia/cu13/lib/libcublasLt.so.13", "nvidia/cu13/lib/libcufftw.so.12",
                "nvidia/cu13/lib/libcusolver.so.12", "nvidia/cudnn/lib/libcudnn.so.9",
                "nvidia/cudnn/lib/libcudnn_ops.so.9", "nvidia/cuda_runtime/lib/libcudart.so.12",  # a CUDA 12 layout too
                "nvidia/cu13/include/x.h"]:
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(b"")
    dirs = cuda.nvidia_library_dirs([str(site), str(tmp_path / "absent")])
    found = [Path(d).relative_to(site).as_posix() for d in dirs]
    assert found == ["nvidia/cu13/lib", "nvidia/cuda_runtime/lib", "nvidia/cudnn/lib"]
    names = sorted(Path(p).name for p in cuda.candidate_libraries(dirs))
    assert names == ["libcublas.so.13", "libcublasLt.so.13", "libcudart.so.12", "libcudart.so.13", "libcudnn.so.9",
                     "libcudnn_ops.so.9"]  # not cufftw, not cusolver: the provider needs neither


def plant_library(directory: Path) -> Path:
    """Put ``nvidia/evil/lib/libcudart.so.99`` under ``directory``, as an attacker would."""
    lib = directory / "nvidia" / "evil" / "lib" / "libcudart.so.99"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    return lib


def test_never_searches_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plant_library(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", ".", "nvidia/..", *sys.path])  # what `python -m` and -c put first
    assert not any(d.startswith(str(tmp_path)) or not os.path.isabs(d) for d in cuda.nvidia_library_dirs())
    assert cuda.nvidia_library_dirs(["", "."]) == []


def test_site_package_dirs_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import site

    extra = tmp_path / "target" / "dist-packages"  # a PYTHONPATH entry pip installed into
    extra.mkdir(parents=True)
    plant_library(tmp_path / "src")  # a sys.path entry that is not a site-packages directory
    monkeypatch.setattr(sys, "path", [str(tmp_path / "src"), *sys.path, str(extra), "site-packages"])
    dirs = cuda.site_package_dirs()
    assert str(extra.resolve()) in dirs and not any(d.startswith(str(tmp_path / "src")) for d in dirs)
    assert all(os.path.isabs(d) for d in dirs)
    assert {os.path.realpath(d) for d in site.getsitepackages() if os.path.isdir(d)} <= set(dirs)


def test_planted_library_in_the_working_directory_is_not_loaded(tmp_path: Path) -> None:
    """A real process started in a directory holding ``nvidia/*/lib`` (sys.path[0] is '' under -c)."""
    plant_library(tmp_path)
    code = ("import sys; from bnpipe.serve import cuda\n"
            "print(sys.path[0] == '', cuda.candidate_libraries(cuda.nvidia_library_dirs()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert out.startswith("True [") and "libcudart.so." in out and "evil" not in out


def test_preloads_the_installed_cuda_libraries() -> None:
    """The venv's real nvidia-* wheels load (no GPU needed to load them), in a fresh process."""
    code = ("from bnpipe.serve import cuda; import os\n"
            "print(' '.join(os.path.basename(p) for p in cuda.preload_cuda_libraries()))")
    names = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    for stem in ("libcudart.so.", "libcublasLt.so.", "libcublas.so.", "libcurand.so.", "libcudnn.so.",
                 "libcudnn_cnn.so."):
        assert any(n.startswith(stem) for n in names), (stem, names)


# --- the model contract -------------------------------------------------------------------------

def test_contract_accepts_the_export() -> None:
    assert check_contract("m", GOOD_IN, GOOD_OUT, GOOD_META) == LABELS


@pytest.mark.parametrize("inputs,match", [
    ([("image", "tensor(uint8)", ["batch", 1, 28, 28])], "graph inputs"),
    ([("pixels", "tensor(float)", ["batch", 1, 28, 28])], "graph inputs"),
    ([("pixels", "tensor(uint8)", ["batch", 3, 28, 28])], "graph inputs"),
    (GOOD_IN * 2, "graph inputs"),
])
def test_contract_refuses_other_inputs(inputs: list, match: str) -> None:
    with pytest.raises(BnpipeError, match=f"^m: {match}"):
        check_contract("m", inputs, GOOD_OUT, GOOD_META)


@pytest.mark.parametrize("meta,match", [
    ({"labels": json.dumps(LABELS)}, "no 'input_layout'"),
    ({**GOOD_META, "input_layout": json.dumps({**LAYOUT, "dtype": "float32"})}, "input layout"),
    ({**GOOD_META, "input_layout": "{oops"}, "not valid JSON"),
    ({**GOOD_META, "labels": json.dumps(LABELS[:9])}, "graph outputs"),
    ({**GOOD_META, "labels": json.dumps([1, 2])}, "not a list of strings"),
])
def test_contract_refuses_bad_metadata(meta: dict, match: str) -> None:
    with pytest.raises(BnpipeError, match=match):
        check_contract("m", GOOD_IN, GOOD_OUT, meta)


def test_load_checks_the_real_graph(tmp_path: Path) -> None:
    from onnx import TensorProto

    wrong = build_model(tmp_path / "f.onnx", input_type=TensorProto.FLOAT)
    with pytest.raises(BnpipeError, match="graph inputs"):
        Model.load(str(wrong), "cpu")
    no_meta = build_model(tmp_path / "n.onnx", drop_metadata=("input_layout",))
    with pytest.raises(BnpipeError, match="no 'input_layout'"):
        Model.load(str(no_meta), "cpu")


def test_unusable_model_files(tmp_path: Path) -> None:
    good = build_model(tmp_path / "good.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "text.onnx"
    text.write_text("this is not a model\n")
    for path, match in [(tmp_path / "missing.onnx", "no such model file"), (tmp_path, "not a file"),
                        (corrupt, "not a usable ONNX model"), (text, "not a usable ONNX model")]:
        with pytest.raises(BnpipeError, match=match) as info:
            Model.load(str(path), "cpu")
        assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_logits_match_the_numpy_reference(tmp_path: Path) -> None:
    model = Model.load(str(build_model(tmp_path / "m.onnx")), "cpu")
    assert model.provider == CPU and model.labels == LABELS
    pixels = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    np.testing.assert_allclose(model.logits(pixels[:, None]), linear_reference(pixels), rtol=1e-5, atol=1e-5)


def test_fixed_rows_runs_one_shape_and_gives_each_batch_its_own_rows(tmp_path: Path) -> None:
    model = Model.load(str(build_model(tmp_path / "m.onnx")), "cpu")
    shapes, tails = [], []

    def run(pixels: np.ndarray) -> np.ndarray:
        shapes.append(pixels.shape)
        tails.append(pixels[n:].any())  # rows past the batch: zeros, never a stale batch
        return model.logits(pixels)

    fixed = FixedRows(run, 8)
    rng = np.random.default_rng(0)
    for n in (3, 8, 1, 5, 8):
        pixels = rng.integers(1, 256, (n, 1, 28, 28), dtype=np.uint8)
        out = fixed(pixels)
        assert out.shape == (n, len(LABELS))
        np.testing.assert_array_equal(out, model.logits(np.concatenate([pixels, np.zeros((8 - n, 1, 28, 28), np.uint8)]))[:n])
        np.testing.assert_allclose(out, linear_reference(pixels[:, 0]), rtol=1e-5, atol=1e-5)
    assert shapes == [(8, 1, 28, 28)] * 5 and not any(tails)
    with pytest.raises(ValueError, match="9 rows do not fit a run of 8"):
        fixed(np.zeros((9, 1, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="at least 1"):
        FixedRows(run, 0)


def test_session_options(tmp_path: Path) -> None:
    model = Model.load(str(build_model(tmp_path / "m.onnx")), "cpu")
    import onnxruntime as ort

    options = model.session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert 1 <= options.intra_op_num_threads <= max(1, min(4, os.cpu_count() or 1))


def test_small_batches_run_on_one_thread_and_large_ones_on_all(tmp_path: Path) -> None:
    path = str(build_model(tmp_path / "m.onnx"))
    model = Model.load(path, "cpu", threads=2)
    assert model.session.get_session_options().intra_op_num_threads == 2
    assert model.small.get_session_options().intra_op_num_threads == 1
    ran: list[str] = []

    class Spy:
        def __init__(self, name: str, session: object) -> None:
            self.name, self.session = name, session

        def run(self, *args: object) -> object:
            ran.append(self.name)
            return self.session.run(*args)  # type: ignore[attr-defined]

    model.session, model.small = Spy("all", model.session), Spy("one", model.small)
    for n in (1, PARALLEL_ROWS - 1, PARALLEL_ROWS, 3 * PARALLEL_ROWS):
        assert model.logits(np.zeros((n, 1, 28, 28), np.uint8)).shape == (n, len(LABELS))
    assert ran == ["one", "one", "all", "all"]
    assert Model.load(path, "cpu", threads=1).small is None  # one thread: one session


@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("export", ["onnx_folded", "onnx_unfolded"])
def test_thread_count_changes_no_bit_of_a_row(exported_models: dict[str, Path], export: str, threads: int) -> None:
    """The batcher's promise: a request's rows are the same merged into a large batch or run alone."""
    model = Model.load(str(exported_models[export]), "cpu", threads=threads)
    assert model.session.get_session_options().intra_op_num_threads == threads
    pixels = np.random.default_rng(0).integers(0, 256, (3 * PARALLEL_ROWS, 1, 28, 28), dtype=np.uint8)
    alone = np.concatenate([model.logits(pixels[i:i + 1]) for i in range(len(pixels))])  # one thread
    np.testing.assert_array_equal(model.logits(pixels), alone)  # two threads
    np.testing.assert_array_equal(model.logits(pixels[:PARALLEL_ROWS - 1]), alone[:PARALLEL_ROWS - 1])
