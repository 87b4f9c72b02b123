"""The Triton repository on disk: written by `write_repository`, found by `find_model` (no model is run)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from bnpipe.errors import BnpipeError
from bnpipe.serve.triton_config import TensorSpec, triton_config
from bnpipe.serve.triton_repo import RepoModel, find_model, write_repository

CONFIG = triton_config("digits", [TensorSpec("pixels", "UINT8", (-1, 1, 28, 28))],
                       [TensorSpec("logits", "FP32", (-1, 10))])


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository holding the model "digits", whose ONNX file is a few marker bytes."""
    onnx_file = tmp_path / "exported.onnx"
    onnx_file.write_bytes(b"onnx bytes")
    assert write_repository(tmp_path / "repo", CONFIG, onnx_file) == tmp_path / "repo" / "digits"
    return tmp_path / "repo"


def test_written_repository_has_the_layout_triton_loads(repo: Path) -> None:
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == \
        ["digits", "digits/1", "digits/1/model.onnx", "digits/config.pbtxt"]  # no temporary files left
    assert (repo / "digits/1/model.onnx").read_bytes() == b"onnx bytes"
    parsed = text_format.Parse((repo / "digits/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert parsed.name == "digits"


def test_find_model_in_the_repository_or_its_model_folder(repo: Path) -> None:
    expected = RepoModel("digits", repo / "digits/1/model.onnx", repo / "digits/config.pbtxt", 1)
    assert find_model(repo) == expected
    assert find_model(str(repo / "digits")) == expected


def test_find_model_takes_the_newest_version_and_triton_fields(repo: Path) -> None:
    model = repo / "digits"
    for version in ("2", "10"):
        (model / version).mkdir()
    (model / "10" / "net.onnx").write_bytes(b"newest")
    (model / "config.pbtxt").write_text(
        '# a comment with { and "quotes"\n'
        'input [ { name: "x{" dims: [ 1 ] } ]\n'  # a nested name is not the model's name
        'name: "digits"  # trailing comment\n'
        'backend: "onnxruntime"\n'
        'default_model_filename: "net.onnx"\n')
    assert find_model(repo) == RepoModel("digits", model / "10/net.onnx", model / "config.pbtxt", 10)


def test_find_model_takes_the_folder_name_when_the_config_has_none(repo: Path) -> None:
    (repo / "digits/config.pbtxt").write_text('platform: "onnxruntime_onnx"\nmax_batch_size: 8\n')
    assert find_model(repo).name == "digits"


@pytest.mark.parametrize(("breakage", "message"), [
    (lambda r: (r / "digits/config.pbtxt").write_text('name: "other"\n'), "name 'other' differs from its folder"),
    (lambda r: (r / "digits/config.pbtxt").write_text('platform: "tensorrt_plan"\n'), "serve runs only"),
    (lambda r: (r / "digits/config.pbtxt").write_text('backend: "python"\n'), "backend 'python'"),
    (lambda r: (r / "digits/1/model.onnx").unlink(), "model.onnx: no such model file"),
    (lambda r: (r / "digits/1/model.onnx").rename(r / "digits/model.onnx") and (r / "digits/1").rmdir(),
     "no version folder"),
    (lambda r: (r / "digits/config.pbtxt").rename(r / "digits/config.txt"), r"found no \*/config.pbtxt"),
    (lambda r: (r / "two").mkdir() or (r / "two/config.pbtxt").write_text(""), "found digits, two"),
])  # fmt: skip
def test_bad_repositories_are_one_line_errors(repo: Path, breakage: Callable[[Path], object], message: str) -> None:
    breakage(repo)
    with pytest.raises(BnpipeError, match=message) as info:
        find_model(repo)
    assert "\n" not in str(info.value)


def test_find_model_refuses_what_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(BnpipeError, match="not a model repository folder"):
        find_model(tmp_path / "model.onnx")
    with pytest.raises(BnpipeError, match="no such folder"):
        find_model(tmp_path / "absent")
