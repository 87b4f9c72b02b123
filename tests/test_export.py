import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from bnpipe import __version__
from bnpipe.cli import cli
from bnpipe.errors import BnpipeError
from bnpipe.export import pipeline
from bnpipe.export.onnx_export import ort_logits, torch_reference_logits
from bnpipe.train.checkpoint import file_sha256, load_checkpoint


def _ops(path: Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_folded_graph_has_no_batchnorm_and_unfolded_keeps_both(exported_models: dict[str, Path]) -> None:
    assert _ops(exported_models["onnx_folded"])["BatchNormalization"] == 0
    assert _ops(exported_models["onnx_unfolded"])["BatchNormalization"] == 2
    assert _ops(exported_models["onnx_folded"])["Conv"] == 2


@pytest.mark.parametrize("kind", ["onnx_folded", "onnx_unfolded"])
def test_pools_export_as_maxpool_nodes(exported_models: dict[str, Path], kind: str) -> None:
    # The CPU fast path of bnpipe.train.maxpool must not leak into the graph as Max/Slice ops.
    ops = _ops(exported_models[kind])
    assert ops["MaxPool"] == 2 and ops["Max"] == 0


@pytest.mark.parametrize("kind", ["onnx_folded", "onnx_unfolded"])
@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_matches_pytorch_eval(exported_models: dict[str, Path], kind: str, batch: int) -> None:
    pixels = np.random.default_rng(batch).integers(0, 256, size=(batch, 1, 28, 28), dtype=np.uint8)
    reference = torch_reference_logits(exported_models["checkpoint"], pixels)
    got = ort_logits(exported_models[kind], pixels)
    assert got.shape == (batch, 10) and got.dtype == np.float32
    assert np.max(np.abs(got - reference)) <= 1e-4
    assert (got.argmax(1) == reference.argmax(1)).all()


def test_model_io_checker_and_metadata(exported_models: dict[str, Path]) -> None:
    model = onnx.load(str(exported_models["onnx_folded"]))
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "pixels" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert out.name == "logits" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    meta = {p.key: p.value for p in model.metadata_props}
    ckpt = load_checkpoint(exported_models["checkpoint"])
    assert json.loads(meta["preprocessing"]) == ckpt["preprocessing"]
    assert json.loads(meta["labels"]) == [str(d) for d in range(10)]
    assert json.loads(meta["input_layout"])["shape"] == ["batch", 1, 28, 28]
    assert meta["bn_folded"] == "true"
    assert meta["source_checkpoint_sha256"] == file_sha256(exported_models["checkpoint"])
    assert float(meta["checkpoint_test_acc"]) == pytest.approx(ckpt["metrics"][-1]["test_acc"], abs=1e-6)
    assert meta["bnpipe_version"] == __version__
    unfolded = {p.key: p.value for p in onnx.load(str(exported_models["onnx_unfolded"])).metadata_props}
    assert unfolded["bn_folded"] == "false"


def test_cli_export_reports_and_writes(trained_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(cli, ["export", "--checkpoint", str(trained_checkpoint), "--out", str(out), "--fold-bn"])
    assert result.exit_code == 0, result.output
    assert "BatchNormalization nodes 2 -> 0" in result.output
    assert "max |logit diff|" in result.output and f"bnpipe predict --model {out}" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_failed_verification_leaves_no_file(trained_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = pipeline.ort_logits
    monkeypatch.setattr(pipeline, "ort_logits", lambda path, pixels: real(path, pixels) + 1e-3)
    with pytest.raises(BnpipeError, match="verification failed"):
        pipeline.export_checkpoint(trained_checkpoint, tmp_path / "m.onnx", fold_bn=True)
    assert list(tmp_path.iterdir()) == []


def test_opset_is_honoured_or_refused(trained_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m21.onnx"
    pipeline.export_checkpoint(trained_checkpoint, out, fold_bn=True, opset=21)
    assert {o.domain: o.version for o in onnx.load(str(out)).opset_import}[""] == 21
    result = CliRunner().invoke(cli, ["export", "--checkpoint", str(trained_checkpoint), "--out", str(out), "--opset", "99"])
    assert result.exit_code == 2 and "--opset" in result.output


def test_fold_of_a_net_without_bn_is_not_reported_as_folded(tiny_mnist: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "none.pt"
    assert CliRunner().invoke(cli, ["train", "--data", str(tiny_mnist), "--epochs", "1", "--bn", "none",
                                    "--out", str(ckpt)]).exit_code == 0
    report = pipeline.export_checkpoint(ckpt, tmp_path / "none.onnx", fold_bn=True)
    assert not report.bn_folded and report.folded == []
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "none.onnx")).metadata_props}
    assert meta["bn_folded"] == "false"


def test_out_may_not_overwrite_the_checkpoint(trained_checkpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m.pt"
    copy.write_bytes(trained_checkpoint.read_bytes())
    result = CliRunner().invoke(cli, ["export", "--checkpoint", str(copy), "--out", str(copy)])
    assert result.exit_code == 1 and "would overwrite the checkpoint" in result.output
    assert copy.read_bytes() == trained_checkpoint.read_bytes()


def test_strict_without_fold_is_a_usage_error(trained_checkpoint: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["export", "--checkpoint", str(trained_checkpoint), "--strict",
                                      "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "--strict only applies with --fold-bn" in result.output


def _bad_checkpoint(kind: str, tmp_path: Path, good: Path) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "corrupt":
        path.write_bytes(good.read_bytes()[:500])
    elif kind == "other_arch":
        ckpt = load_checkpoint(good)
        ckpt["arch"] = dict(ckpt["arch"], name="resnet18")
        torch.save(ckpt, path)
    elif kind == "other_weights":
        ckpt = load_checkpoint(good)
        ckpt["state_dict"]["classifier.weight"] = torch.zeros(10, 123)
        torch.save(ckpt, path)
    elif kind == "missing_weights":
        ckpt = load_checkpoint(good)
        del ckpt["state_dict"]["features.1.running_var"]
        torch.save(ckpt, path)
    elif kind == "bad_preprocessing":
        ckpt = load_checkpoint(good)
        ckpt["preprocessing"] = {"mode": "half"}
        torch.save(ckpt, path)
    elif kind == "tab_label":
        ckpt = load_checkpoint(good)
        ckpt["labels"][3] = "three\tthree"
        torch.save(ckpt, path)
    elif kind == "bad_metrics":
        ckpt = load_checkpoint(good)
        ckpt["metrics"] = [1]
        torch.save(ckpt, path)
    elif kind == "image_size":
        ckpt = load_checkpoint(good)
        ckpt["arch"]["image_size"] = 32
        torch.save(ckpt, path)
    elif kind == "onnx_file":
        path.write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(100))
    elif kind == "not_bnpipe":
        torch.save({"model": torch.zeros(3)}, path)
    return path


@pytest.mark.parametrize(
    ("kind", "needle"),
    [("missing", "no such file"), ("corrupt", "not a readable checkpoint file (truncated or corrupt"),
     ("other_arch", "resnet18"),
     ("other_weights", "does not fit"), ("missing_weights", "running_var"),
     ("bad_preprocessing", "field 'preprocessing'"), ("tab_label", "field 'labels'"),
     ("bad_metrics", "field 'metrics'"), ("image_size", "image_size 32"), ("onnx_file", "not a readable checkpoint file (not a file torch.save wrote)"),
     ("not_bnpipe", "not a bnpipe checkpoint")],
)
def test_bad_checkpoint_is_one_line(trained_checkpoint: Path, tmp_path: Path, kind: str, needle: str) -> None:
    bad = _bad_checkpoint(kind, tmp_path, trained_checkpoint)
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(cli, ["export", "--checkpoint", str(bad), "--out", str(out)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnpipe: error: checkpoint") and needle in lines[0], lines
    assert not out.exists()


def test_a_data_root_named_but_empty_is_an_error_not_random_pixels(trained_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(cli, ["export", "--checkpoint", str(trained_checkpoint), "--out", str(out),
                                      "--data", str(tmp_path / "typo")])
    assert result.exit_code == 1 and not out.exists()
    assert result.output == f"bnpipe: error: --data {tmp_path / 'typo'}: no MNIST test images " \
                            f"({tmp_path / 'typo' / 'MNIST' / 'raw' / 't10k-images-idx3-ubyte'} is missing)\n"
