"""Resuming: checkpoints carry optimizer, scheduler, epoch and RNG; a resumed run is bit-identical."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import bnpipe.train.loop as loop
from bnpipe.cli import cli
from bnpipe.errors import BnpipeError
from bnpipe.train.checkpoint import load_checkpoint
from bnpipe.train.config import TrainConfig
from bnpipe.train.distributed import epoch_order


def _config(tiny_mnist: Path, out: Path, **kw: object) -> TrainConfig:
    return TrainConfig(data=str(tiny_mnist), epochs=3, limit_train=160, batch_size=32, device="cpu", out=str(out), **kw)


def _stop_after(monkeypatch: pytest.MonkeyPatch, epochs: int) -> None:
    """Interrupt the run right after the checkpoint of epoch ``epochs`` is written, as a Ctrl-C would."""
    real = loop.write_artifacts

    def write_then_stop(config: TrainConfig, net: object, arch: object, norm: object, metrics: list, state: dict,
                        run: dict) -> None:
        real(config, net, arch, norm, metrics, state, run)
        if state["epoch"] == epochs:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "write_artifacts", write_then_stop)


def test_data_order_depends_only_on_seed_and_epoch() -> None:
    torch.manual_seed(123)  # the global RNG plays no part
    a = epoch_order(100, seed=0, epoch=2)
    torch.manual_seed(456)
    assert torch.equal(a, epoch_order(100, seed=0, epoch=2))
    assert not torch.equal(a, epoch_order(100, seed=0, epoch=3)) and not torch.equal(a, epoch_order(100, 1, 2))
    assert sorted(a.tolist()) == list(range(100))


def test_stop_after_two_then_resume_to_three_is_bit_identical(tiny_mnist: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    straight = _config(tiny_mnist, tmp_path / "straight.pt", bn="scratch")
    loop.train(straight, log=lambda line: None)
    stopped = replace(straight, out=str(tmp_path / "stopped.pt"))
    with monkeypatch.context() as m:
        _stop_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            loop.train(stopped, log=lambda line: None)
    ckpt = load_checkpoint(stopped.out)
    assert ckpt["resume"]["epoch"] == 2 and set(ckpt["resume"]) >= {"optimizer", "scheduler", "rng_state"}
    torch.manual_seed(999)  # resuming restores the RNG state itself
    lines: list[str] = []
    loop.train(stopped, log=lines.append, resume=stopped.out)
    assert lines[0] == f"resuming from {stopped.out} after epoch 2/3" and lines[1].startswith("epoch 3/3")
    a, b = load_checkpoint(straight.out), load_checkpoint(stopped.out)
    assert all(torch.equal(a["state_dict"][k], v) for k, v in b["state_dict"].items())
    assert [m["train_loss"] for m in a["metrics"]] == [m["train_loss"] for m in b["metrics"]]
    assert a["resume"]["optimizer"]["state"][0]["momentum_buffer"].equal(b["resume"]["optimizer"]["state"][0]["momentum_buffer"])


def test_cli_resume_continues_in_place_with_the_runs_own_settings(tiny_mnist: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.pt"
    with monkeypatch.context() as m:
        _stop_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            loop.train(_config(tiny_mnist, out, lr=0.05), log=lambda line: None)
    result = CliRunner().invoke(cli, ["train", "--resume", str(out), "--data", str(tiny_mnist)])
    assert result.exit_code == 0, result.output
    assert "after epoch 1/3" in result.output and "epoch 3/3" in result.output
    ckpt = load_checkpoint(out)
    assert [r["epoch"] for r in ckpt["metrics"]] == [1, 2, 3] and ckpt["config"]["lr"] == 0.05


@pytest.mark.parametrize(("args", "needle"), [
    (["--lr", "0.2"], "--lr 0.2: --resume continues the run with its own settings (lr = 0.1)"),
    ([], "the run finished all 3 epochs; nothing to resume"),
])
def test_resume_refusals_are_one_line(tiny_mnist: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "m.pt"
    loop.train(_config(tiny_mnist, out), log=lambda line: None)
    before = out.read_bytes()
    result = CliRunner().invoke(cli, ["train", "--resume", str(out), "--data", str(tiny_mnist), *args])
    assert result.exit_code == 1 and needle in result.output and len(result.output.strip().splitlines()) == 1
    assert out.read_bytes() == before


def test_checkpoint_without_resume_state_is_refused(tiny_mnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    cfg = _config(tiny_mnist, out)
    loop.train(cfg, log=lambda line: None)
    ckpt = torch.load(out, weights_only=True)
    del ckpt["resume"]
    torch.save(ckpt, out)
    with pytest.raises(BnpipeError, match="holds no resume state"):
        loop.train(cfg, resume=str(out))
