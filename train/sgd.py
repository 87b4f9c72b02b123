"""A fused SGD step on the CPU without ``Optimizer.step``'s Python around the kernel.

In a CPU training step of this net, ``optimizer.step()`` took 0.15 ms of 3.3 (timers around each line of
the step), though its fused kernel updates only 5,000 numbers: the rest is the Python that wraps it
(grad mode, hooks, profiling, grouping the tensors by device and dtype), which costs several times more
between the step's large ops than it does alone. :func:`sgd_step` calls the same kernel,
``torch._fused_sgd_``, with what ``SGD.step`` would pass it, so the parameters and momentum buffers are
the same bit for bit (``tests/test_sgd.py``). Paired blocks of steps took 0.958x the time.
"""

from __future__ import annotations

import torch


def plain_fused_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is a ``torch.optim.SGD`` with ``fused=True`` in every group, no step hooks and no
    ``step`` of its own but an LR scheduler's wrapper (which only notes that the optimizer stepped).

    Args:
        optimizer: The training's optimizer.

    Returns:
        True where the fused kernel alone is the whole step: no hook or wrapper expects to run around it.
    """
    from torch.optim import optimizer as optim_module

    hooks = (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks,
             optim_module._global_optimizer_pre_hooks, optim_module._global_optimizer_post_hooks)
    wrapper = vars(optimizer).get("step")
    return (type(optimizer) is torch.optim.SGD and all(g.get("fused") for g in optimizer.param_groups)
            and not any(hooks) and (wrapper is None or getattr(wrapper, "_wrapped_by_lr_sched", False)))


def _kernel_calls(optimizer: torch.optim.Optimizer) -> list[tuple[list[torch.Tensor], ...]] | None:
    """Each group's parameters, gradients and momentum buffers for the kernel; None where
    ``optimizer.step()`` must take the step.

    ``optimizer.step()`` takes the steps that make state or that something must see: a step that creates
    the momentum buffers, the first step after an LR scheduler wrapped ``step`` (so that it knows the
    optimizer stepped before it), a learning rate held in a tensor (a CUDA graph's capture), gradient
    scaling (``grad_scale``, ``found_inf``, set by ``GradScaler``), a differentiable step, sparse gradients,
    parameters off the CPU. One pass checks and gathers: the checks cost 1.6% of a step when they walked
    the parameters apart from the gathering.
    """
    if not plain_fused_sgd(optimizer) or getattr(optimizer, "grad_scale", None) is not None \
            or getattr(optimizer, "found_inf", None) is not None \
            or ("step" in vars(optimizer) and not getattr(optimizer, "_opt_called", False)):
        return None
    calls = []
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor) or group.get("differentiable"):
            return None
        params = [p for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if not all(p.is_cpu and not g.is_sparse for p, g in zip(params, grads)):
            return None
        buffers = [optimizer.state[p].get("momentum_buffer") for p in params] if group["momentum"] != 0 else []
        if any(b is None for b in buffers):
            return None
        calls.append((params, grads, buffers))
    return calls


def _direct(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`sgd_step` would call the kernel itself (see :func:`_kernel_calls`)."""
    return _kernel_calls(optimizer) is not None


def sgd_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``, with the fused kernel called directly where :func:`_kernel_calls` allows.

    Args:
        optimizer: The optimizer, its parameters' ``.grad`` set.
    """
    calls = _kernel_calls(optimizer)
    if calls is None:
        optimizer.step()
        return
    for group, (params, grads, buffers) in zip(optimizer.param_groups, calls):
        if params:
            torch._fused_sgd_(params, grads, buffers, weight_decay=group["weight_decay"], momentum=group["momentum"],
                              lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                              maximize=group["maximize"], is_first_step=False)
