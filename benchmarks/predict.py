"""Speed and accuracy targets of `bnpipe predict`, each a ratio against a baseline in the same run.

1. Cold start: median wall time of `bnpipe predict one.png` (the venv's console script) against
   `python -c "import onnxruntime, numpy, PIL.Image"`, both as whole processes. Target <= 2.0x.
2. Throughput: `bnpipe predict DIR` on the 10,000 MNIST test images as PNG files against a
   process that only decodes the same files with Pillow in a loop. Target <= 1.3x, process
   start included on both sides.
3. Accuracy: the labels `bnpipe predict` gives those PNGs against t10k-labels, and against the
   `checkpoint_test_acc` that `bnpipe export` verified and wrote into the model's metadata.

Usage: python benchmarks/predict.py [--model models/bn_convnet.onnx] [--data ../shared/data]
Runs are interleaved (baseline, candidate, baseline, ...) so that load from other processes hits
both alike. Exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bnpipe.serve.samples import read_idx, write_samples

BIN = Path(sys.executable).parent
COLD_TARGET, THROUGHPUT_TARGET = 2.0, 1.3
ACC_TOLERANCE = 0.002  # 20 of 10,000 images: float differences may flip a near-tie, no more
IMPORT_BASELINE = "import onnxruntime, numpy, PIL.Image"
DECODE_BASELINE = """
import os, sys, time
import numpy as np
from PIL import Image
start = time.perf_counter()
d = sys.argv[1]
for name in sorted(os.listdir(d)):
    with Image.open(os.path.join(d, name)) as im:
        np.asarray(im)  # decode to pixels, as bnpipe must
print(time.perf_counter() - start)
"""


def timed(cmd: list[str]) -> tuple[float, str]:
    """Run ``cmd`` as a whole process; return (wall seconds, stdout). Fails loudly on non-zero exit."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])}... exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return wall, done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/bn_convnet.onnx")
    parser.add_argument("--data", default=os.environ.get("BNPIPE_DATA", "../shared/data"))
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--cold-repeats", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    labels = read_idx(Path(args.data) / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")  # [10000] uint8
    bnpipe = [str(BIN / "bnpipe"), "predict", "--model", args.model, "--device", args.device]
    missed = []
    # The targets assume the cores are free: other processes' load shows up in every ratio.
    print(f"machine: {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable, load average "
          f"{os.getloadavg()[0]:.2f}; model {args.model}, --device {args.device}")
    with tempfile.TemporaryDirectory(prefix="bnpipe-bench-") as tmp:
        pngs = Path(tmp) / "t10k"
        one = write_samples(args.data, pngs)[0]  # 10,000 files named INDEX_LABEL.png

        timed(bnpipe + [str(one)])  # warm the page cache and .pyc files for both sides
        timed([sys.executable, "-c", IMPORT_BASELINE])
        base_cold, cold = [], []
        for _ in range(args.cold_repeats):
            base_cold.append(timed([sys.executable, "-c", IMPORT_BASELINE])[0])
            cold.append(timed(bnpipe + [str(one)])[0])
        b, c = statistics.median(base_cold), statistics.median(cold)
        print(f"cold start: bnpipe predict one.png {c:.3f} s, python -c '{IMPORT_BASELINE}' {b:.3f} s "
              f"(medians of {args.cold_repeats}): {c / b:.2f}x (target <= {COLD_TARGET}x)")
        if c / b > COLD_TARGET:
            missed.append("cold start")

        base_walls, base_loops, walls, output = [], [], [], ""
        for _ in range(args.repeats):
            wall, out = timed([sys.executable, "-c", DECODE_BASELINE, str(pngs)])
            base_walls.append(wall)
            base_loops.append(float(out))
            wall, output = timed(bnpipe + [str(pngs)])
            walls.append(wall)
        b, c, loop = statistics.median(base_walls), statistics.median(walls), statistics.median(base_loops)
        print(f"throughput: bnpipe predict DIR {c:.3f} s ({len(labels) / c:,.0f} images/s), decode-only process "
              f"{b:.3f} s (its loop {loop:.3f} s, {len(labels) / loop:,.0f} images/s; medians of {args.repeats}): "
              f"{c / b:.2f}x (target <= {THROUGHPUT_TARGET}x)")
        if c / b > THROUGHPUT_TARGET:
            missed.append("throughput")

    # one line per image: path<TAB>label<TAB>probability, the path's stem being INDEX_LABEL
    rows = [line.split("\t") for line in output.splitlines()]
    predicted = {int(Path(path).stem.split("_")[0]): int(label) for path, label, _ in rows}
    if len(predicted) != len(labels):
        sys.exit(f"bnpipe printed {len(predicted)} predictions for {len(labels)} images")
    acc = float(np.mean([predicted[i] == labels[i] for i in range(len(labels))]))
    import onnxruntime as ort

    meta = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    verified = float(meta["checkpoint_test_acc"])
    verified = verified / 100 if verified > 1 else verified  # a percentage, if written as one
    print(f"accuracy: {acc:.4f} on the 10,000 PNGs vs t10k-labels; the model's checkpoint_test_acc {verified:.4f}; "
          f"difference {abs(acc - verified):.4f} (target <= {ACC_TOLERANCE})")
    if abs(acc - verified) > ACC_TOLERANCE:
        missed.append("accuracy")
    print("all targets met" if not missed else f"MISSED: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
