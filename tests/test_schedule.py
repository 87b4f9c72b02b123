import pytest
import torch

from bnpipe.errors import BnpipeError
from bnpipe.train.recipe import make_scheduler, resolve_device


def _lrs(schedule: str, steps: int = 100) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    sched = make_scheduler(opt, schedule, steps)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert opt.param_groups[0]["momentum"] == 0.9, "the schedule must keep the configured momentum"
    return lrs


def test_none_is_constant() -> None:
    assert set(_lrs("none")) == {0.1}


def test_cosine_decays_from_peak_to_zero() -> None:
    lrs = _lrs("cosine")
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] < 1e-3
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_onecycle_warms_up_for_a_fifth_then_anneals() -> None:
    lrs = _lrs("onecycle")
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert 18 <= peak <= 21 and lrs[peak] == pytest.approx(0.1, rel=1e-3)
    assert lrs[0] < 0.01 and lrs[-1] < 1e-3


def test_unknown_schedule_and_device_are_clear_errors() -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(BnpipeError, match="--schedule linear"):
        make_scheduler(opt, "linear", 10)
    with pytest.raises(BnpipeError, match="--device tpu"):
        resolve_device("tpu")


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 9])
def test_onecycle_survives_tiny_runs(steps: int) -> None:
    lrs = _lrs("onecycle", steps)
    assert len(lrs) == steps and all(0 < lr <= 0.1 + 1e-12 for lr in lrs)
