"""`keep_freed_memory`: training steps stop page-faulting their activations back in (it returns True on glibc)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A child process, since mallopt's settings last for the process: faults per training step of 64.
STEPS = """
import resource, sys, torch, torch.nn.functional as F
from bnpipe.train.allocator import keep_freed_memory
from bnpipe.train.model import build_model, default_arch
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
model = build_model(default_arch())
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
def step():
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
for _ in range(20):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
"""


def _faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "2", "PATH": ""})
    return float(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_training_steps_reuse_their_memory() -> None:
    kept, default = _faults_per_step("keep"), _faults_per_step("default")
    assert kept < 5, f"{kept} page faults per step with freed memory kept ({default} without)"
    assert default > 10 * max(kept, 1), f"the default allocator faulted only {default} times per step; the test shows nothing"

