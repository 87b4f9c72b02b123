"""DDP through torchrun on the CPU (gloo, 2 processes on 127.0.0.1): sync BN, two nodes, faults, bad setups.

Each test starts its own processes in a new session and kills that session when it overruns.
The runs are tiny: 192 training images, global batch 64, so 3 steps per epoch.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnpipe.train.checkpoint import load_checkpoint
from bnpipe.train.config import TrainConfig
from bnpipe.train.loop import train

EPOCHS, LIMIT, BATCH = 3, 192, 64  # 3 steps per epoch, 9 in all
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
             "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def train_args(data: Path, out: Path, *more: str) -> list[str]:
    return ["-m", "bnpipe", "train", "--data", str(data), "--epochs", str(EPOCHS), "--limit-train", str(LIMIT),
            "--batch-size", str(BATCH), "--device", "cpu", "--dist-timeout", "60", "--out", str(out), *more]


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    """Wait for ``proc``; past ``timeout`` kill its whole session (torchrun and its workers) and fail."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} ran past {timeout}s:\n{out}\n{err[-3000:]}")
    return proc.returncode, out, err


def run(cmd: list[str], timeout: float = 90, **env: str) -> tuple[str, str]:
    code, out, err = finish(start(cmd, clean_env(**env)), timeout)
    assert code == 0, f"{cmd} exited {code}:\n{out}\n{err[-3000:]}"
    return out, err


def state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], part: str = "") -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if part in k)


@pytest.fixture(scope="module")
def one_process(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    """1 process x 64, same data order: with our BN (what --bn sync is in one process) and with nn.BatchNorm2d."""
    out = tmp_path_factory.mktemp("single")
    runs = {}
    for bn in ("sync", "torch"):
        cfg = TrainConfig(data=str(tiny_mnist), epochs=EPOCHS, limit_train=LIMIT, batch_size=BATCH, device="cpu",
                          bn=bn, out=str(out / f"{bn}.pt"))
        train(cfg, log=lambda line: None)
        runs[bn] = state(out / f"{bn}.pt")
    return runs


@pytest.fixture(scope="module")
def two_ranks_sync(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 ranks x 32 with --bn sync, through torchrun; the uninterrupted reference for the fault test too."""
    out = tmp_path_factory.mktemp("sync") / "m.pt"
    run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", *train_args(tiny_mnist, out, "--bn", "sync")])
    return out


def test_sync_bn_on_two_ranks_equals_one_process_on_the_global_batch(
    two_ranks_sync: Path, one_process: dict[str, dict[str, torch.Tensor]]
) -> None:
    ddp = state(two_ranks_sync)
    assert ddp["features.1.num_batches_tracked"].item() == EPOCHS * LIMIT // BATCH
    assert max_diff(ddp, one_process["sync"]) < 1e-5  # parameters and running statistics, after 9 steps
    # nn.BatchNorm2d's run takes the fused first conv + BN (bnpipe.train.conv_bn): the same function, rounded
    # differently (both within 1e-6 of float64 after one step); 9 steps at lr 0.1 made that 1.7e-5 here.
    assert max_diff(ddp, one_process["torch"]) < 1e-4
    assert load_checkpoint(two_ranks_sync)["arch"]["bn"] == "scratch", "a synced BN is a plain one in eval"


def test_two_nodes_through_c10d_rendezvous_and_unsynced_statistics_drift(
    tiny_mnist: Path, tmp_path: Path, one_process: dict[str, dict[str, torch.Tensor]]
) -> None:
    # Two torchrun agents ("nodes") of one process each meet at a c10d rendezvous on 127.0.0.1.
    out, port = tmp_path / "m.pt", free_port()
    node = [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "bnpipe-test", "--rdzv-conf", "join_timeout=60",
            *train_args(tiny_mnist, out, "--bn", "torch")]
    procs = [start(node, clean_env()) for _ in range(2)]
    results = [finish(p, 120) for p in procs]
    assert all(code == 0 for code, _, _ in results), results
    assert sum("final test accuracy" in o for _, o, _ in results) == 1, "only rank 0 reports"
    ddp, single = state(out), one_process["torch"]
    # Without sync, each rank normalizes with its own 32 images: the running statistics (rank 0's,
    # which DDP broadcasts) drift from those of the 64-image batches, far beyond float rounding.
    drift = max(max_diff(ddp, single, "running_mean"), max_diff(ddp, single, "running_var"))
    assert 1e-3 < drift < 0.5, drift


def test_killed_rank_is_restarted_and_resumes_to_the_same_weights(tiny_mnist: Path, tmp_path: Path,
                                                                   two_ranks_sync: Path) -> None:
    out = tmp_path / "m.pt"
    # Rank 1 SIGKILLs itself after global step 5: mid-epoch 2, after epoch 1's checkpoint.
    stdout, stderr = run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                          *train_args(tiny_mnist, out, "--bn", "sync")], timeout=150, BNPIPE_TEST_KILL_AT="1:5")
    assert "exitcode: -9" in stderr, stderr[-2000:]  # the SIGKILL, as torchrun reports it
    assert f"resuming from {out} after epoch 1/{EPOCHS}" in stdout, stdout
    ckpt = load_checkpoint(out)
    assert [m["epoch"] for m in ckpt["metrics"]] == [1, 2, 3] and ckpt["resume"]["epoch"] == EPOCHS
    reference = state(two_ranks_sync)
    assert all(torch.equal(v, reference[k]) for k, v in ckpt["state_dict"].items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.png", "m.pt"], "no half-written files"


def test_unreachable_master_fails_fast_with_one_line(tiny_mnist: Path, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there: rank 1 waits for a rank 0 that never comes
    env = clean_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    t0 = time.monotonic()
    code, out, err = finish(start([sys.executable, *train_args(tiny_mnist, tmp_path / "m.pt", "--dist-timeout", "2")],
                                  env), 60)
    assert code == 1 and time.monotonic() - t0 < 45
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("bnpipe: error: distributed setup: rank 1 of 2 could not join the gloo process group "
                               f"at 127.0.0.1:{port} (timeout 2s): ")
    assert not (tmp_path / "m.pt").exists()


def test_nproc_per_node_hands_over_to_torchrun(tiny_mnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    stdout, _ = run([sys.executable, *train_args(tiny_mnist, out, "--epochs", "1", "--nproc-per-node", "2")])
    assert stdout.count("final test accuracy") == 1
    assert load_checkpoint(out)["config"]["epochs"] == 1


def test_precise_bn_on_two_ranks_averages_over_both(tiny_mnist: Path, tmp_path: Path) -> None:
    # Synced BN keeps the weights those of one process on the global batch (above); precise BN then runs
    # each rank's half of the same batches, and the all-reduced sums give one process's statistics.
    more = ("--bn", "sync", "--precise-bn", "3", "--epochs", "1")
    run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", *train_args(tiny_mnist, tmp_path / "ddp.pt", *more)])
    cfg = TrainConfig(data=str(tiny_mnist), epochs=1, limit_train=LIMIT, batch_size=BATCH, device="cpu", bn="sync",
                      precise_bn=3, out=str(tmp_path / "one.pt"))
    train(cfg, log=lambda line: None)
    ddp, single = state(tmp_path / "ddp.pt"), state(tmp_path / "one.pt")
    assert load_checkpoint(tmp_path / "ddp.pt")["metrics"][-1]["precise_bn_batches"] == 3
    assert max(max_diff(ddp, single, "running_mean"), max_diff(ddp, single, "running_var")) < 1e-5


def test_ctrl_c_reaching_the_launcher_exits_130_without_a_traceback(tiny_mnist: Path, tmp_path: Path) -> None:
    import select

    args = train_args(tiny_mnist, tmp_path / "m.pt", "--nproc-per-node", "2")
    args[args.index("--epochs") + 1] = "1000"  # still running when the signal comes
    proc = start([sys.executable, *args], clean_env())
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    assert ready and proc.stdout.readline().startswith("DDP on gloo"), "the workers did not start"
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole foreground group
    code, _, err = finish(proc, 60)
    assert code == 130 and "Traceback" not in err, err[-3000:]
