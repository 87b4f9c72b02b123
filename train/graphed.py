"""A CUDA training step captured once as a CUDA graph, then replayed: the GPU stops waiting on Python.

A batch of 64 through this net is some 60 small kernels (gather, forward, backward, fused SGD), each
a few microseconds of GPU work. Launched one by one from Python they leave the GPU idle most of a
step: 1.4-2.0 s an epoch on an H100. A replayed graph launches them all in one call. The recipe is
PyTorch's whole-network capture (``torch.cuda.graphs``): a few eager steps on a side stream, gradients
set to None, then capture; each later step copies its batch indices and learning rate into the
tensors that the graph reads.
"""

from __future__ import annotations

import torch
from torch import nn

from bnpipe.train.conv_bn import hooked, params_hooked
from bnpipe.train.sgd import plain_fused_sgd
from bnpipe.train.step import train_step

WARMUP = 3  # eager steps before capture: cuDNN and cuBLAS set up their handles and workspaces lazily


def applies(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, distributed: bool) -> bool:
    """Whether a replayed graph gives the eager step's results.

    It needs CUDA, one process (DDP's gradient hooks talk to other ranks) and fused SGD, whose kernel
    reads a learning rate from device memory (the others read it on the host, which capture forbids).
    A hook (on a module, a parameter or the optimizer) would run once, at capture, and never again;
    autocast and anomaly mode are not captured; a BN with ``momentum=None`` reads its batch count on the host.
    """
    return (inputs.device.type == "cuda" and not distributed and not hooked(*model.modules())
            and plain_fused_sgd(optimizer) and not torch.is_autocast_enabled("cuda") and not torch.is_anomaly_enabled()
            and not params_hooked(p for g in optimizer.param_groups for p in g["params"])
            and all(getattr(m, "momentum", 0.0) is not None for m in model.modules()))


def _settings(optimizer: torch.optim.Optimizer) -> list[dict[str, object]]:
    """Each parameter group's settings that a capture bakes in: all but the parameters and the rate."""
    return [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]


class GraphedStep:
    """Training steps of one batch size for one epoch: ``WARMUP`` eager ones, then one graph replayed.

    The step adds its summed loss and correct count into ``loss_sum`` and ``correct`` (device scalars),
    as the eager loop does, so that the epoch still syncs with the host only for its checks.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                 labels: torch.Tensor, batch: int, loss_scale: float, loss_sum: torch.Tensor,
                 correct: torch.Tensor) -> None:
        """Set up the tensors that every replay reads: the batch's indices and the learning rates."""
        self.model, self.optimizer, self.inputs, self.labels = model, optimizer, inputs, labels
        self.batch, self.loss_scale, self.loss_sum, self.correct = batch, loss_scale, loss_sum, correct
        self.idx = torch.zeros(batch, dtype=torch.long, device=inputs.device)
        # One device scalar per parameter group: the graph reads the rate there, the scheduler keeps floats.
        self.lrs = [torch.tensor(float(g["lr"]), device=inputs.device) for g in optimizer.param_groups]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.seen: list[dict[str, object]] = _settings(optimizer)  # the optimizer's settings at the last step
        self.side = torch.cuda.Stream()
        self.eager_steps = 0

    def _step(self) -> None:
        """Gather the batch at ``self.idx`` and take the step: what the graph holds."""
        x, y = self.inputs.index_select(0, self.idx), self.labels.index_select(0, self.idx)
        train_step(self.model, self.optimizer, x, y, self.loss_scale, self.loss_sum, self.correct)

    def __call__(self, idx: torch.Tensor) -> None:
        """One training step on the rows ``idx`` [batch] of the inputs."""
        self.idx.copy_(idx)
        now = _settings(self.optimizer)
        if self.eager_steps < WARMUP or now != self.seen:
            # Warm-up, or a scheduler just moved momentum or weight decay, which a graph holds: an eager
            # step, and a capture once the settings hold still (never while they move every step). Eager
            # too the first step with momentum, which creates the buffers a capture must not see missing.
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                self._step()
            torch.cuda.current_stream().wait_stream(self.side)
            self.eager_steps += 1
            if now != self.seen:
                self.seen, self.graph = now, None
        else:
            if self.graph is None:
                self._capture()
            for lr, group in zip(self.lrs, self.optimizer.param_groups, strict=True):
                lr.fill_(group["lr"])
            self.graph.replay()  # type: ignore[union-attr]

    def _capture(self) -> None:
        """Record one step. Its gradients are allocated in the graph's pool, and each replay overwrites them."""
        floats = [group["lr"] for group in self.optimizer.param_groups]
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            group["lr"] = lr  # fused SGD then reads the rate from device memory, not a constant baked in
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step()
        finally:
            for rate, group in zip(floats, self.optimizer.param_groups):
                group["lr"] = rate
        self.graph = graph
