"""`bnpipe export --triton-repo`: a Triton model repository whose config Triton's own schema accepts."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from bnpipe.cli import cli
from bnpipe.serve.triton_repo import export_repository, find_model

KIND = model_config_pb2.ModelInstanceGroup


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_cli_writes_a_repository_triton_accepts(trained_checkpoint: Path, tmp_path: Path) -> None:
    out, repo = tmp_path / "m.onnx", tmp_path / "repo"
    result = CliRunner().invoke(cli, ["export", "--fold-bn", "--checkpoint", str(trained_checkpoint), "--out", str(out),
                                      "--triton-repo", str(repo)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"wrote Triton model repository {repo / 'bnpipe'}" in result.output
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == \
        ["bnpipe", "bnpipe/1", "bnpipe/1/model.onnx", "bnpipe/config.pbtxt"]
    assert (repo / "bnpipe/1/model.onnx").read_bytes() == out.read_bytes()
    cfg = read_config(repo / "bnpipe/config.pbtxt")
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("bnpipe", "onnxruntime_onnx", 256)
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == \
        [("pixels", model_config_pb2.TYPE_UINT8, [1, 28, 28])]
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [("logits", model_config_pb2.TYPE_FP32, [10])]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert [g.kind for g in cfg.instance_group] == [KIND.KIND_GPU]
    assert cfg.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "cuda"
    assert [w.batch_size for w in cfg.model_warmup] == [1, 16, 64, 256]
    found = find_model(repo)
    assert (found.name, found.onnx_path) == ("bnpipe", repo / "bnpipe/1/model.onnx")


def test_cpu_repository_under_another_name(exported_models: dict[str, Path], tmp_path: Path) -> None:
    folder = export_repository(tmp_path, exported_models["onnx_folded"], "digits", "cpu", max_batch_size=32)
    cfg = read_config(folder / "config.pbtxt")
    assert cfg.name == "digits" and [g.kind for g in cfg.instance_group] == [KIND.KIND_CPU]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [16, 32] and not cfg.HasField("optimization")


def test_bad_model_name_fails_before_exporting(trained_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(cli, ["export", "--checkpoint", str(trained_checkpoint), "--out", str(out),
                                      "--triton-repo", str(tmp_path / "repo"), "--triton-name", "a/b"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == ["bnpipe: error: model name 'a/b': use letters, digits, '_', "
                                                  "'.' and '-' (it names a folder)"]
    assert not out.exists() and not (tmp_path / "repo").exists()
