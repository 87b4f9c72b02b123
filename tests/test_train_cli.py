import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bnpipe.cli import cli
from bnpipe.train.checkpoint import load_checkpoint, model_from_checkpoint

METRIC_KEYS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"}


def _train(args: list[str]) -> "object":
    return CliRunner().invoke(cli, ["train", *args])


def test_train_writes_checkpoint_sidecar_and_plot(tiny_mnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "run" / "m.pt"
    result = _train(["--data", str(tiny_mnist), "--epochs", "2", "--normalize", "dataset", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.count("epoch ") == 2 and "test loss" in result.output
    ckpt = load_checkpoint(out)
    assert ckpt["arch"]["bn"] == "torch" and ckpt["preprocessing"]["mode"] == "dataset"
    assert ckpt["config"]["epochs"] == 2 and len(ckpt["metrics"]) == 2
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert METRIC_KEYS <= set(sidecar["metrics"][0]) and sidecar["config"]["normalize"] == "dataset"
    assert sidecar["run"] == ckpt["run"] == {"device": "cpu", "processes": 1, "torch_version": torch.__version__}
    assert sidecar["bnpipe_version"] == ckpt["bnpipe_version"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.json", "m.png", "m.pt"], "no temp files left"
    model_from_checkpoint(ckpt)  # rebuilt from the checkpoint alone


def test_same_seed_same_weights(tiny_mnist: Path, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b", "c"):
        seed = "1" if name == "c" else "0"
        out = tmp_path / f"{name}.pt"
        assert _train(["--data", str(tiny_mnist), "--epochs", "1", "--seed", seed, "--out", str(out)]).exit_code == 0
        runs.append(load_checkpoint(out)["state_dict"])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_scratch_checkpoint_loads_into_torch_bn(tiny_mnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.pt"
    assert _train(["--data", str(tiny_mnist), "--epochs", "1", "--bn", "scratch", "--out", str(out)]).exit_code == 0
    ckpt = load_checkpoint(out)
    ours, theirs = model_from_checkpoint(ckpt), model_from_checkpoint(ckpt, bn="torch")
    assert type(theirs.features[1]).__name__ == "BatchNorm2d"
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--epochs", "0"], 2, "--epochs"),
        (["--bn", "group"], 2, "--bn"),
        (["--lr", "-1"], 2, "--lr"),
        (["--lr", "nan"], 2, "'--lr': 'nan' is not a finite number"),
        (["--weight-decay", "inf"], 2, "'--weight-decay': 'inf' is not a finite number"),
        (["--dist-timeout", "nan"], 2, "'--dist-timeout': 'nan' is not a finite number"),
        (["--seed", "-1"], 2, "'--seed': -1 is not in the range"),
        (["--seed", str(2**64)], 2, "'--seed'"),
        (["--device", "cuda"], 1, "--device cuda: no CUDA GPU"),
    ],
)
def test_bad_options_get_one_clear_line(
    tiny_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], code: int, needle: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    result = _train(["--data", str(tiny_mnist), "--out", str(tmp_path / "x.pt"), *args])
    assert result.exit_code == code
    assert needle in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.pt").exists()


def test_missing_data_dir_is_one_line(tmp_path: Path) -> None:
    result = _train(["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "x.pt")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnpipe: error: MNIST not found in")


def test_nan_in_epoch_two_keeps_epoch_one_checkpoint(tiny_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bnpipe.train.loop as loop

    real, calls = loop.train_one_epoch, []

    def failing_second_epoch(*args: object, **kwargs: object) -> tuple[float, float]:
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("training loss is not finite")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", failing_second_epoch)
    out = tmp_path / "m.pt"
    result = _train(["--data", str(tiny_mnist), "--epochs", "3", "--out", str(out)])
    assert result.exit_code == 1 and "non-finite in epoch 2" in result.output and str(out) in result.output
    assert [m["epoch"] for m in load_checkpoint(out)["metrics"]] == [1]
    assert json.loads(out.with_suffix(".json").read_text())["metrics"][0]["epoch"] == 1
    assert out.with_suffix(".png").is_file()


def test_no_progress_bar_when_stderr_is_not_a_terminal(tiny_mnist: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["train", "--data", str(tiny_mnist), "--epochs", "1", "--out", str(tmp_path / "m.pt")])
    assert result.exit_code == 0
    assert "it/s" not in result.stderr and "train:" not in result.stderr and "%|" not in result.output


@pytest.mark.parametrize("suffix", [".json", ".png"])
def test_out_cannot_collide_with_the_sidecars(tiny_mnist: Path, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"m{suffix}"
    result = _train(["--data", str(tiny_mnist), "--out", str(out)])
    assert result.exit_code == 1 and "sidecar" in result.output and not out.exists()


@pytest.mark.parametrize("out", ["", "/proc/m.pt"])
def test_unwritable_out_fails_before_training(tiny_mnist: Path, monkeypatch: pytest.MonkeyPatch, out: str) -> None:
    import bnpipe.train.loop as loop

    monkeypatch.setattr(loop, "load_mnist", lambda *a, **k: pytest.fail("data loaded before --out was checked"))
    result = _train(["--data", str(tiny_mnist), "--out", out])
    assert result.exit_code == 1 and result.output.startswith("bnpipe: error: ") and "Traceback" not in result.output


def test_non_finite_loss_keeps_last_good_checkpoint(tiny_mnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    assert _train(["--data", str(tiny_mnist), "--epochs", "1", "--out", str(out)]).exit_code == 0
    before = out.read_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _train(["--data", str(tiny_mnist), "--epochs", "1", "--lr", "1e30", "--out", str(out)])
    assert result.exit_code == 1 and "non-finite" in result.output
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]  # the one line, no numpy overflow noise
    assert out.read_bytes() == before


def test_non_finite_test_loss_stops_the_run(tiny_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bnpipe.train.loop as loop

    real, calls = loop.evaluate, []

    def nan_in_epoch_two(*args: object, **kwargs: object) -> tuple[float, float]:
        calls.append(1)
        loss, acc = real(*args, **kwargs)
        return (float("nan") if len(calls) == 2 else loss), acc  # e.g. BN statistics gone non-finite

    monkeypatch.setattr(loop, "evaluate", nan_in_epoch_two)
    out = tmp_path / "m.pt"
    result = _train(["--data", str(tiny_mnist), "--epochs", "3", "--out", str(out)])
    assert result.exit_code == 1 and "test loss became non-finite in epoch 2" in result.output
    assert [m["epoch"] for m in load_checkpoint(out)["metrics"]] == [1]


def test_each_epoch_is_written_before_its_line(tiny_mnist: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import bnpipe.train.loop as loop

    out, seen = tmp_path / "m.pt", []

    def log(line: str) -> None:  # the reader went away after line 1 (`| head -1`): printing line 2 fails
        seen.append(line)
        if line.startswith("epoch 2/"):
            raise BrokenPipeError

    monkeypatch.setattr(loop, "resolve_device", lambda device: torch.device("cpu"))
    config = loop.TrainConfig(data=str(tiny_mnist), epochs=3, device="cpu", out=str(out))
    with pytest.raises(BrokenPipeError):
        loop.train(config, log=log)
    assert [m["epoch"] for m in load_checkpoint(out)["metrics"]] == [1, 2]  # epoch 2 was saved before its line


def test_a_global_batch_under_the_process_count_is_refused_before_any_worker(tiny_mnist: Path, tmp_path: Path) -> None:
    result = _train(["--data", str(tiny_mnist), "--batch-size", "1", "--nproc-per-node", "2",
                     "--out", str(tmp_path / "m.pt")])
    assert result.exit_code == 1 and not (tmp_path / "m.pt").exists()
    assert result.output == "bnpipe: error: --batch-size 1: the global batch is split over 2 processes; give it at least 2\n"
