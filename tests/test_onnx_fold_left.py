"""`bnpipe fold`: BNs left in place with their reason, refusals, verification, and the command line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from bnpipe.cli import cli
from bnpipe.errors import BnpipeError
from bnpipe.export import onnx_fold
from bnpipe.export.fold_math import fold_bn_arrays, round_once
from bnpipe.export.onnx_fold import fold_graph
from bnpipe.export.onnx_fold_file import fold_onnx_file
from bnpipe.export.onnx_verify import random_inputs
from tests.onnx_graphs import bn_node, layer_bn, make_model, ops, with_bn


def _consumer_of_conv_output() -> onnx.ModelProto:
    model = layer_bn("Conv")
    model.graph.node.append(helper.make_node("Relu", ["h"], ["r"]))
    model.graph.output.append(helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [2, 6, 3, 3]))
    return model


def _weight_as_input(overridable: bool) -> onnx.ModelProto:
    model = layer_bn("Conv")
    w = next(t for t in model.graph.initializer if t.name == "w")
    model.graph.input.append(helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, list(w.dims)))
    if not overridable:  # a plain graph input: no value in the file at all
        model.graph.initializer.remove(w)
    return model


def _dequantized_weight() -> onnx.ModelProto:
    # A QDQ model: the weight is int8 with a scale. Folding would have to requantize; turning it into
    # float32 would quietly make the model 4x larger and no longer quantized.
    model = layer_bn("Conv")
    w = next(t for t in model.graph.initializer if t.name == "w")
    scale = np.float32(np.abs(numpy_helper.to_array(w)).max() / 127)
    q = np.round(numpy_helper.to_array(w) / scale).astype(np.int8)
    model.graph.initializer.remove(w)
    model.graph.initializer.extend([numpy_helper.from_array(q, "w_q"), numpy_helper.from_array(scale, "w_scale")])
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"]))
    return model


def _bn_mean_as_input() -> onnx.ModelProto:
    model = layer_bn("Conv")
    mean = next(t for t in model.graph.initializer if t.name == "bn.mean")
    model.graph.initializer.remove(mean)
    model.graph.input.append(helper.make_tensor_value_info("bn.mean", onnx.TensorProto.FLOAT, [6]))
    return model


def _matmul_3d() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = {"w": rng.standard_normal((5, 6)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32),
             **with_bn("bn", 6)}  # fmt: skip
    nodes = [helper.make_node("MatMul", ["a", "w"], ["m"], name="mm"), helper.make_node("Add", ["m", "b"], ["h"]),
             bn_node("h", "y", "bn")]  # fmt: skip
    return make_model(nodes, {"a": [3, 6, 5]}, ["y"], inits)  # BN's axis 1 is the 6 rows, not MatMul's columns


def _after_relu() -> onnx.ModelProto:
    return make_model([helper.make_node("Relu", ["x"], ["h"]), bn_node("h", "y", "bn")], {"x": [2, 6, 3]}, ["y"],
                      with_bn("bn", 6))  # fmt: skip


# case -> (model, words of the reason)
LEFT: dict[str, tuple[Callable[[], onnx.ModelProto], str]] = {
    "output-used-twice": (_consumer_of_conv_output, "also used elsewhere"),
    "weight-is-input": (lambda: _weight_as_input(False), "not a constant"),
    "weight-overridable": (lambda: _weight_as_input(True), "not a constant"),
    "weight-dequantized": (_dequantized_weight, "not a constant"),
    "bn-param-is-input": (_bn_mean_as_input, "mean or variance input is not"),
    "matmul-3d": (_matmul_3d, "shapes do not prove"),
    "after-relu": (_after_relu, "not Conv, ConvTranspose, Gemm or MatMul+Add"),
}


@pytest.mark.parametrize("case", LEFT)
def test_bn_left_with_its_reason_and_strict_refuses(tmp_path: Path, case: str) -> None:
    make, words = LEFT[case]
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(make(), str(src))
    report = fold_onnx_file(src, out)
    assert report.folded == [] and list(report.left) == ["bn"] and words in report.left["bn"]
    assert ops(onnx.load(str(out)))["BatchNormalization"] == 1
    out.unlink()
    with pytest.raises(BnpipeError, match=r"^--strict: 1 BatchNormalization cannot be folded: bn \("):
        fold_onnx_file(src, out, strict=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


@pytest.mark.parametrize("form", ["training_mode=1", "opset9-outputs"])
def test_training_mode_bn_is_refused_by_name(form: str) -> None:
    model = layer_bn("Conv")
    if form == "training_mode=1":
        model.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    else:  # before opset 14, a BN with its running-statistics outputs is the training form
        model.opset_import[0].version = 9
        model.graph.node[1].output.extend(["mean_out", "var_out", "saved_mean", "saved_var"])
    with pytest.raises(BnpipeError, match=r"^bn: BatchNormalization has (training_mode=1|5 outputs, the training)"):
        fold_graph(model)


def test_corrupted_fold_fails_verification_and_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def corrupted(*args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        w, b = fold_bn_arrays(*args, **kwargs)
        w *= 1.001  # 0.1% off: ten times --tolerance
        return w, b

    monkeypatch.setattr(onnx_fold, "fold_bn_arrays", corrupted)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(layer_bn("Conv"), str(src))
    with pytest.raises(BnpipeError, match=r"verification failed, max difference .* exceeds --tolerance"):
        fold_onnx_file(src, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_bfloat16_gemm_weights_rounded_once() -> None:
    # onnxruntime has no bfloat16 Gemm on the CPU: this checks the graph rewrite alone.
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 5)).astype(ml_dtypes.bfloat16)
    nodes = [helper.make_node("Gemm", ["a", "w"], ["h"], name="gemm", transB=1), bn_node("h", "y", "bn")]
    model = make_model(nodes, {"a": [3, 5]}, ["y"], {"w": w, **with_bn("bn", 6, dtype=ml_dtypes.bfloat16)},
                       elem=onnx.TensorProto.BFLOAT16, opset=22)  # fmt: skip
    stats = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert fold_graph(model).folded == [("gemm", "bn")]
    new = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    f64 = {k: v.astype(np.float64) for k, v in stats.items()}
    scale = f64["bn.gamma"] / np.sqrt(f64["bn.var"] + 1e-3)  # by hand, not through fold_bn_arrays
    exact = w.astype(np.float64) * scale[:, None]  # transB: one row per output
    got = new[model.graph.node[0].input[1]]
    assert got.dtype == ml_dtypes.bfloat16 and np.array_equal(got, round_once(exact, ml_dtypes.bfloat16))


def test_round_once_to_bfloat16_is_a_single_rounding() -> None:
    # 1 + 2^-8 + tiny is just above the midpoint of bfloat16's 1 and 1 + 2^-7: it rounds up. Through
    # float32 the tiny part is lost, the midpoint ties to even, and the result is 1.
    x = np.array([1 + 2**-8 + 1e-9, -(1 + 2**-8 + 1e-9), 1 + 2**-8, 3.0])
    assert round_once(x, ml_dtypes.bfloat16).astype(np.float64).tolist() == [1 + 2**-7, -(1 + 2**-7), 1.0, 3.0]
    assert x.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)[0] == 1.0


def _fold_cli(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(cli, ["fold", *args])
    return result.exit_code, result.output.strip().splitlines()


def test_cli_folds_and_reports(tmp_path: Path) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    model = layer_bn("Conv")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(model, str(src))
    code, lines = _fold_cli(str(src), str(out), "--shape", "x=3,4,5,5", "--tolerance", "1e-5")
    assert code == 0, lines
    assert lines[0] == f"wrote {out}: nodes 2 -> 1, BatchNormalization nodes 1 -> 0"
    assert lines[1] == "folded bn into layer" and "max difference" in lines[2] and lines[3].startswith("done in")


@pytest.mark.parametrize("case", ["missing", "not-onnx", "same-file", "unwritable", "bad-shape", "empty-shape",
                                  "unknown-input", "wrong-rank"])
def test_cli_bad_input_is_one_line(tmp_path: Path, case: str) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(layer_bn("Conv"), str(src))
    args, needle = {
        "missing": ([str(tmp_path / "nope.onnx"), str(out)], "nope.onnx: no such file"),
        "not-onnx": ([str(tmp_path / "text.onnx"), str(out)], "not an ONNX model"),
        "same-file": ([str(src), str(src)], "is the input file"),
        "unwritable": ([str(src), str(tmp_path / "text.onnx" / "out.onnx")], "cannot write"),  # under a file
        # A malformed --shape is a usage error (exit 2); a zero dim makes an empty tensor, which proves nothing.
        "bad-shape": ([str(src), str(out), "--shape", "x=1,a"], "'--shape': 'x=1,a': expected NAME=D1,D2"),
        "empty-shape": ([str(src), str(out), "--shape", "x=0,3,8,8"], "'--shape': 'x=0,3,8,8': expected NAME=D1,D2"),
        "unknown-input": ([str(src), str(out), "--shape", "z=1"], "--shape z: the model has no such input"),
        "wrong-rank": ([str(src), str(out), "--shape", "x=2,3"], "--shape x=2,3: the input is [2, 4, 5, 5]"),
    }[case]  # fmt: skip
    (tmp_path / "text.onnx").write_text("not a model, just some text\n" * 20)
    before = src.read_bytes()
    code, lines = _fold_cli(*args)
    assert code == (2 if case.endswith("-shape") else 1), lines
    assert len(lines) == 1 and lines[0].startswith("bnpipe: error: ") and needle in lines[0], lines
    assert not out.exists() and src.read_bytes() == before


@pytest.mark.parametrize("broken", ["BatchNormalization", "Conv"])
def test_cli_malformed_model_is_one_line(tmp_path: Path, broken: str) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    model = layer_bn("Conv")
    node = next(n for n in model.graph.node if n.op_type == broken)
    del node.input[1:]  # a BN without its statistics, a Conv without its weight
    onnx.save(model, str(src))
    code, lines = _fold_cli(str(src), str(out))
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"bnpipe: error: {src}: not a valid ONNX model ("), lines
    assert broken in lines[0] and not out.exists()


def test_random_inputs_take_each_inputs_type_and_shape() -> None:
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], {"x": ["batch", 3, "h"]}, ["y"], {},
                       elem=onnx.TensorProto.UINT8)  # fmt: skip
    assert random_inputs(model, {})["x"].shape == (1, 3, 1)  # dynamic dims take 1
    feeds = random_inputs(model, {"x": (4, 3, 7)})
    assert feeds["x"].shape == (4, 3, 7) and feeds["x"].dtype == np.uint8 and feeds["x"].max() > 1
    with pytest.raises(BnpipeError, match=r"--shape x=4,2,7: the input is \[batch, 3, h\]"):
        random_inputs(model, {"x": (4, 2, 7)})
