"""`bnpipe fold` on small ONNX graphs: each producer kind, and the safe-rewriting rules."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnpipe.export.fold_math import bn_scale, fold_bn_arrays
from bnpipe.errors import BnpipeError
from bnpipe.export.onnx_fold_file import FoldFileReport, fold_onnx_file
from bnpipe.export.onnx_verify import default_tolerance
from tests.onnx_graphs import (
    assert_same_per_channel, bn_node, layer_bn, make_model, ops, run, with_bn,
)  # fmt: skip

F16 = onnx.TensorProto.FLOAT16


def fold_file(model: onnx.ModelProto, tmp_path: Path, **kwargs: object) -> tuple[FoldFileReport, onnx.ModelProto]:
    """Save ``model``, fold it with :func:`fold_onnx_file`, and load the result."""
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    report = fold_onnx_file(src, out, **kwargs)
    return report, onnx.load(str(out))


def assert_same_outputs(model: onnx.ModelProto, folded: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                        rtol: float = 2e-5) -> None:  # fmt: skip
    """Both models give the same outputs on random inputs (run here, not by the code under test)."""
    rng = np.random.default_rng(7)
    elem = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    feeds = {k: rng.standard_normal(s).astype(helper.tensor_dtype_to_np_dtype(elem[k])) for k, s in shapes.items()}
    for want, got in zip(run(model, feeds), run(folded, feeds), strict=True):
        assert_same_per_channel(got, want, rtol)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_conv_and_conv_transpose_fold(tmp_path: Path, op: str, dims: int, group: int, bias: bool) -> None:
    model = layer_bn(op, dims, group, bias)
    report, folded = fold_file(model, tmp_path, strict=True)
    assert report.folded == [("layer", "bn")] and ops(folded) == {op: 1}
    assert_same_outputs(model, folded, {"x": (2, 4, *[5] * dims)})


@pytest.mark.parametrize("c_shape", [None, (), (6,), (1, 6), (3, 6), (3, 1)], ids=str)
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_folds_with_trans_b_alpha_beta_and_any_bias(tmp_path: Path, trans_b: int, c_shape: tuple | None) -> None:
    rng = np.random.default_rng(2)
    inits = {"w": rng.standard_normal((6, 5) if trans_b else (5, 6)).astype(np.float32), **with_bn("bn", 6)}
    inputs = ["a", "w"]
    if c_shape is not None:
        inits["c"] = rng.standard_normal(c_shape).astype(np.float32)
        inputs.append("c")
    nodes = [helper.make_node("Gemm", inputs, ["h"], name="gemm", transB=trans_b, alpha=0.7, beta=1.3),
             bn_node("h", "y", "bn")]  # fmt: skip
    model = make_model(nodes, {"a": [3, 5]}, ["y"], inits)
    report, folded = fold_file(model, tmp_path, strict=True)
    assert report.folded == [("gemm", "bn")] and ops(folded) == {"Gemm": 1}
    assert_same_outputs(model, folded, {"a": (3, 5)})


def _matmul_add_bn(rank: int) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = {"w": rng.standard_normal((5, 6)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32),
             **with_bn("bn", 6)}  # fmt: skip
    nodes = [helper.make_node("MatMul", ["a", "w"], ["m"], name="mm"), helper.make_node("Add", ["m", "b"], ["h"]),
             bn_node("h", "y", "bn")]  # fmt: skip
    return make_model(nodes, {"a": [3, 5] if rank == 2 else [3, 6, 5]}, ["y"], inits)


def test_matmul_add_folds_on_a_2d_input(tmp_path: Path) -> None:
    model = _matmul_add_bn(2)
    report, folded = fold_file(model, tmp_path, strict=True)
    assert report.folded == [("mm", "bn")] and ops(folded) == {"MatMul": 1, "Add": 1}
    assert_same_outputs(model, folded, {"a": (3, 5)})


def test_shared_weight_gets_a_new_initializer(tmp_path: Path) -> None:
    # Two Conv+BN pairs and a bare Conv read one weight: each fold writes its own; the bare Conv keeps it.
    rng = np.random.default_rng(4)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h1"], name="c1"), bn_node("h1", "y1", "bn1"),
             helper.make_node("Conv", ["x", "w"], ["h2"], name="c2"), bn_node("h2", "y2", "bn2"),
             helper.make_node("Conv", ["x", "w"], ["y3"], name="c3")]  # fmt: skip
    model = make_model(nodes, {"x": [1, 4, 5, 5]}, ["y1", "y2", "y3"], {"w": w, **with_bn("bn1", 6), **with_bn("bn2", 6, 1)})
    report, folded = fold_file(model, tmp_path)
    assert report.left == {} and ops(folded) == {"Conv": 3}
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    weights = [n.input[1] for n in folded.graph.node]
    assert weights[2] == "w" and np.array_equal(inits["w"], w) and len(set(weights)) == 3
    assert_same_outputs(model, folded, {"x": (1, 4, 5, 5)})


def test_bn_graph_output_keeps_its_name_and_metadata_is_kept(tmp_path: Path) -> None:
    model = layer_bn("Conv")
    helper.set_model_props(model, {"author": "someone"})
    _, folded = fold_file(model, tmp_path)
    assert [o.name for o in folded.graph.output] == ["y"] and folded.graph.node[0].output[0] == "y"
    meta = {p.key: p.value for p in folded.metadata_props}
    assert meta["author"] == "someone" and '"folded": 1' in meta["bnpipe_folded"]
    onnx.checker.check_model(folded, full_check=True)


def test_external_data_loads_and_saves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = layer_bn("Conv", dims=3)  # a 2.5 KB weight: past onnx's 1 KB threshold for external data
    src, out = tmp_path / "in.onnx", tmp_path / "out" / "folded.onnx"
    stored = onnx.ModelProto()
    stored.CopyFrom(model)  # saving as external data empties the tensors it writes out
    onnx.save(stored, str(src), save_as_external_data=True, location="in.weights", size_threshold=0)
    fold_onnx_file(src, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["folded.onnx", "folded.onnx.data"]
    folded = onnx.load(str(out))  # reads folded.onnx.data
    bare = onnx.load(str(out), load_external_data=False)
    external = [t.name for t in bare.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external == [bare.graph.node[0].input[1]]  # the folded 2.5 KB weight; the bias stays inline
    assert_same_outputs(model, folded, {"x": (2, 4, 5, 5, 5)})
    # Again, from the output's folder: onnx's own save refuses when OUT.data exists in the current directory.
    monkeypatch.chdir(out.parent)
    fold_onnx_file(src, "folded.onnx")
    assert onnx.load("folded.onnx").SerializeToString() == folded.SerializeToString()
    (tmp_path / "in.weights").unlink()
    with pytest.raises(BnpipeError, match=f"^{src}: cannot read its external data "):
        fold_onnx_file(src, out)


def test_an_old_out_is_never_left_beside_new_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(layer_bn("Conv", dims=3), str(src), save_as_external_data=True, location="in.weights", size_threshold=0)
    fold_onnx_file(src, out)
    moves: list[str] = []

    def move(a: str, b: str) -> None:  # the process dies after the weights' rename, before the model's
        moves.append(b)
        if len(moves) == 2:
            raise KeyboardInterrupt
        shutil.copyfile(a, b)

    monkeypatch.setattr("bnpipe.export.onnx_fold_file.shutil.move", move)
    with pytest.raises(KeyboardInterrupt):
        fold_onnx_file(src, out)
    assert not out.exists() and (tmp_path / "out.onnx.data").exists()  # missing, never paired with other weights


def test_the_binary_format_whatever_the_suffix(tmp_path: Path) -> None:
    src, out = tmp_path / "in.json", tmp_path / "out.json"  # onnx would parse and write JSON for these names
    onnx.save(layer_bn("Conv"), str(src), format="protobuf")
    fold_onnx_file(src, out)
    assert ops(onnx.load(str(out), format="protobuf"))["BatchNormalization"] == 0
    assert onnx.ModelProto.FromString(out.read_bytes()).graph.node  # the binary format on disk


def test_a_failed_fold_leaves_no_folder_and_points_at_shape(tmp_path: Path) -> None:
    model = layer_bn("Conv")  # a 3x3 conv: the check's dynamic dims of 1 make an input it cannot run
    for d in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_param = "side"
    src, out = tmp_path / "in.onnx", tmp_path / "new" / "deeper" / "out.onnx"
    onnx.save(model, str(src))
    with pytest.raises(BnpipeError, match=r"dynamic dims of x were set to 1 for the check: give real shapes "
                                          r"with --shape NAME=D1,D2,...\)$") as info:
        fold_onnx_file(src, out)
    assert "\n" not in str(info.value) and sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]
    assert fold_onnx_file(src, out, shapes={"x": (2, 4, 5, 5)}).max_rel_diff < 1e-5


def test_default_tolerance_follows_the_narrowest_float_type() -> None:
    assert default_tolerance(layer_bn("Conv")) == 1e-4
    assert default_tolerance(layer_bn("Conv", dtype=np.float16, elem=F16)) == 8 * 2.0**-10
    assert default_tolerance(layer_bn("Conv", dtype=np.float16, elem=onnx.TensorProto.FLOAT)) == 8 * 2.0**-10


def test_float16_weights_are_rounded_once(tmp_path: Path) -> None:
    model = layer_bn("Conv", bias=False, dtype=np.float16, elem=F16)
    for t in model.graph.initializer:  # gamma 1e3 over var 1e-8 would overflow float16's 65504
        if t.name in ("bn.gamma", "bn.var"):
            t.CopyFrom(numpy_helper.from_array(np.linspace(0.5, 1.5, 6).astype(np.float16), t.name))
    report, folded = fold_file(model, tmp_path)  # the default tolerance for float16: 8 epsilons, not 1e-4
    assert report.tolerance == 8 * 2.0**-10 and report.max_rel_diff > 1e-4
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    conv = folded.graph.node[0]
    f64 = {k: v.astype(np.float64) for k, v in inits.items()}
    scale = f64["bn.gamma"] / np.sqrt(f64["bn.var"] + 1e-3)  # by hand, not through fold_bn_arrays
    exact_w = f64["w"] * scale[:, None, None, None]
    exact_b = f64["bn.beta"] - f64["bn.mean"] * scale
    assert new[conv.input[1]].dtype == np.float16 and new[conv.input[2]].dtype == np.float16
    assert np.array_equal(new[conv.input[1]], exact_w.astype(np.float16))  # float64 -> float16, one rounding
    assert np.array_equal(new[conv.input[2]], exact_b.astype(np.float16))
    assert_same_outputs(model, folded, {"x": (2, 4, 5, 5)}, rtol=2e-3)


@pytest.mark.parametrize("opset, attrs", [(9, {}), (8, {"spatial": 1}), (7, {})], ids=["opset9", "opset8-spatial", "opset7"])
def test_old_opset_bn_with_initializers_listed_as_inputs(tmp_path: Path, opset: int, attrs: dict) -> None:
    # Old exporters (IR 3) list every initializer among the graph inputs too.
    model = layer_bn("Conv")
    model.graph.node[1].attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    model.opset_import[0].version, model.ir_version = opset, 3
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in model.graph.initializer)
    report, folded = fold_file(model, tmp_path, strict=True)
    assert report.folded == [("layer", "bn")]
    assert {i.name for i in folded.graph.input} == {"x"} | {t.name for t in folded.graph.initializer}
    assert_same_outputs(model, folded, {"x": (2, 4, 5, 5)})


def test_dead_constant_bias_chain_is_evaluated_and_removed(tmp_path: Path) -> None:
    # torch's exporter with optimize=False writes a missing bias as Expand(CastLike(0, x), Shape(W)).
    model = layer_bn("Conv", bias=False)
    zero = helper.make_tensor("zero", onnx.TensorProto.DOUBLE, [], [0.0])
    chain = [helper.make_node("Shape", ["w"], ["ws"], start=0, end=1),
             helper.make_node("Constant", [], ["z"], value=zero), helper.make_node("CastLike", ["z", "x"], ["zf"]),
             helper.make_node("Expand", ["zf", "ws"], ["b"])]  # fmt: skip
    model.graph.node[0].input.append("b")
    for i, node in enumerate(chain):
        model.graph.node.insert(i, node)
    report, folded = fold_file(model, tmp_path, strict=True)
    assert report.folded == [("layer", "bn")] and ops(folded) == {"Conv": 1}
    assert_same_outputs(model, folded, {"x": (2, 4, 5, 5)})


def test_bn_scale_is_gamma_over_root_var_plus_eps() -> None:
    assert bn_scale([3.0, 0.0], 1.0, [4.0, 2.0]).tolist() == [2.0, 2.0]
    # A Gemm's full [M, C] bias: the channel is the last axis.
    _, b = fold_bn_arrays(np.eye(2), np.array([[1.0, 2.0], [3.0, 4.0]]), [1.0, 2.0], [3.0, 0.0], 1.0, [4.0, 2.0], [1.0, 0.0])
    assert b.tolist() == [[1.0, 0.0], [5.0, 4.0]]  # (b - mean) * [2, 2] + [1, 0]


@pytest.mark.parametrize("opset", [14, 15, 25])
def test_newer_opsets(tmp_path: Path, opset: int) -> None:
    # 14: training_mode appears (0 here); 15: BN's statistics may have their own type; 25: the newest.
    model = layer_bn("Conv", dims=1)
    model.opset_import[0].version = opset
    model.graph.node[1].attribute.append(helper.make_attribute("training_mode", 0))
    report, folded = fold_file(model, tmp_path, strict=True)
    assert report.folded == [("layer", "bn")] and ops(folded) == {"Conv": 1}
    assert_same_outputs(model, folded, {"x": (2, 4, 5)})


def test_readers_and_writers_stay_true_to_the_graph_across_folds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fold keeps its index of readers and writers up to date instead of recounting it for each BN.

    At every BN the index must equal a fresh count over the graph without the BNs folded so far.
    """
    from bnpipe.export import onnx_fold

    rng = np.random.default_rng(5)
    inits = {"w1": rng.standard_normal((6, 4, 3, 3)).astype(np.float32), "b1": rng.standard_normal(6).astype(np.float32),
             "w2": rng.standard_normal((6, 4, 1, 1)).astype(np.float32), "w3": rng.standard_normal((5, 6)).astype(np.float32),
             "b3": rng.standard_normal(6).astype(np.float32),
             **with_bn("bn1", 6), **with_bn("bn1b", 6, 1), **with_bn("bn2", 6, 2), **with_bn("bn3", 6, 3)}  # fmt: skip
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], name="c1"), bn_node("h1", "y1", "bn1"),
             bn_node("y1", "z1", "bn1b"),  # folds into c1 too
             helper.make_node("Conv", ["x", "w2"], ["h2"], name="c2"), bn_node("h2", "y2", "bn2"),
             helper.make_node("Relu", ["h2"], ["r2"]),  # bn2 is left: its input is read twice
             helper.make_node("MatMul", ["a", "w3"], ["m"], name="mm"), helper.make_node("Add", ["m", "b3"], ["h3"]),
             bn_node("h3", "y3", "bn3")]  # fmt: skip
    model = onnx.shape_inference.infer_shapes(make_model(nodes, {"x": [1, 4, 5, 5], "a": [3, 5]}, ["z1", "y2", "r2", "y3"], inits))
    assert {"h1", "h2", "h3"} <= {v.name for v in model.graph.value_info}
    graph, checked = model.graph, []
    plan = onnx_fold._plan

    def check_then_plan(bn: onnx.NodeProto, producers: dict, uses: object, *rest: object) -> object:
        live = [n for n in graph.node if n.op_type != "BatchNormalization" or producers.get(n.output[0]) is n]
        fresh = collections.Counter(o.name for o in graph.output)
        for node in live:
            fresh.update(name for name in node.input if name)
        assert {k: v for k, v in uses.items() if v} == fresh, bn.name  # type: ignore[attr-defined]
        assert {k: id(v) for k, v in producers.items()} == {o: id(n) for n in live for o in n.output if o}, bn.name
        checked.append(bn.name)
        return plan(bn, producers, uses, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx_fold, "_plan", check_then_plan)
    original = onnx.ModelProto.FromString(model.SerializeToString())
    result = onnx_fold.fold_graph(model)
    assert checked == ["bn1", "bn1b", "bn2", "bn3"]
    assert result.folded == [("c1", "bn1"), ("c1", "bn1b"), ("mm", "bn3")] and set(result.left) == {"bn2"}
    assert ops(model) == {"Conv": 2, "BatchNormalization": 1, "Relu": 1, "MatMul": 1, "Add": 1}
    infos = {v.name for v in model.graph.value_info}
    assert "h2" in infos and not infos & {"h1", "h3"}  # the renamed outputs' old shapes are gone
    feeds = {"x": rng.standard_normal((1, 4, 5, 5)).astype(np.float32), "a": rng.standard_normal((3, 5)).astype(np.float32)}
    for got, want in zip(run(model, feeds), run(original, feeds)):
        assert_same_per_channel(got, want)


@pytest.mark.parametrize("producer", ["Conv", "Gemm", "MatMul"])
def test_two_bns_in_a_row_fold_into_one_layer_rounded_once(tmp_path: Path, producer: str) -> None:
    rng = np.random.default_rng(6)
    stats = {**with_bn("bn1", 6), **with_bn("bn2", 6, 1)}
    w = rng.standard_normal((6, 4, 3, 3) if producer == "Conv" else (4, 6)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    if producer == "Conv":
        layer = [helper.make_node("Conv", ["x", "w", "b"], ["h"], name="layer")]
    elif producer == "Gemm":
        layer = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="layer", alpha=0.5, beta=2.0)]
    else:
        layer = [helper.make_node("MatMul", ["x", "w"], ["m"], name="layer"), helper.make_node("Add", ["m", "b"], ["h"])]
    nodes = [*layer, bn_node("h", "y", "bn1"), bn_node("y", "z", "bn2")]
    shape = [2, 4, 5, 5] if producer == "Conv" else [3, 4]
    model = make_model(nodes, {"x": shape}, ["z"], {"w": w, "b": b, **stats})
    report, folded = fold_file(model, tmp_path, strict=True)
    assert report.folded == [("layer", "bn1"), ("layer", "bn2")] and "BatchNormalization" not in ops(folded)
    # By hand, in float64: each BN is y = (x - mean) * gamma / sqrt(var + 1e-3) + beta on the channel axis.
    w64, b64 = w.astype(np.float64), b.astype(np.float64)
    if producer == "Gemm":
        w64, b64 = 0.5 * w64, 2.0 * b64
    for p in ("bn1", "bn2"):
        eps = float(np.float32(1e-3))  # an ONNX float attribute is a float32
        scale = stats[f"{p}.gamma"].astype(np.float64) / np.sqrt(stats[f"{p}.var"].astype(np.float64) + eps)
        w64 = w64 * (scale[:, None, None, None] if producer == "Conv" else scale)
        b64 = (b64 - stats[f"{p}.mean"]) * scale + stats[f"{p}.beta"]
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    weight = next(n for n in folded.graph.node if n.op_type == layer[0].op_type).input[1]
    np.testing.assert_array_equal(inits[weight], w64.astype(np.float32))  # rounded once, from float64
    assert len(inits) == 2  # the first fold's own initializers are gone
    [bias] = set(inits) - {weight}
    np.testing.assert_array_equal(inits[bias].reshape(-1), b64.astype(np.float32))
    assert_same_outputs(model, folded, {"x": tuple(shape)})


def test_training_bn_is_refused_before_any_fold_leaving_the_graph_as_it_was() -> None:
    from bnpipe.errors import BnpipeError
    from bnpipe.export.onnx_fold import fold_graph

    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h1"], name="c1"), bn_node("h1", "y1", "bn1"),
             helper.make_node("Conv", ["y1", "w2"], ["h2"], name="c2"), bn_node("h2", "y2", "bn2", training_mode=1)]
    inits = {"w1": rng.standard_normal((6, 4, 1, 1)).astype(np.float32),
             "w2": rng.standard_normal((6, 6, 1, 1)).astype(np.float32), **with_bn("bn1", 6), **with_bn("bn2", 6, 1)}
    model = make_model(nodes, {"x": [1, 4, 3, 3]}, ["y2"], inits)
    before = model.SerializeToString()
    with pytest.raises(BnpipeError, match="^bn2: BatchNormalization has training_mode=1"):
        fold_graph(model)
    assert model.SerializeToString() == before  # bn1 was not folded first
