#!/usr/bin/env bash
# `bnpipe predict` with onnxruntime-gpu on a lent GPU machine (no pip index there).
# Before: ../shared/gpu/split_wheel.sh here; carry .gpuwheel/p00 .. p03 in calls of their own, then
# run this script carrying the last piece, .gpuslim (the click wheel), .gpudata (MNIST, gzipped) and models.
set -u
repo=$(pwd)
cat .gpuwheel/p*/part > /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
python3 -m pip install -q --no-deps --target /tmp/site /tmp/onnxruntime_gpu-*.whl .gpuslim/*.whl
export PYTHONPATH=/tmp/site:/tmp/pkgs:${PYTHONPATH:-}
mkdir -p /tmp/pkgs/bnpipe /tmp/data/MNIST/raw
cp bnpipe/*.py /tmp/pkgs/bnpipe/
for stage in train export serve; do ln -sfn "$repo/$stage" "/tmp/pkgs/bnpipe/$stage"; done
for f in .gpudata/t10k*.gz; do gunzip -c "$f" > "/tmp/data/MNIST/raw/$(basename "$f" .gz)"; done
cd /tmp  # so that `bnpipe` is the assembled package, not the repo folder of that name
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_device(), o.get_available_providers())"
python3 -m bnpipe samples --data /tmp/data -n 10000 --out /tmp/png > /dev/null
echo "== -v --device cuda, then auto"
python3 -m bnpipe predict -v --model "$repo/models/bn_convnet.onnx" --device cuda "$repo/models/samples" 2>&1 | head -2
python3 -m bnpipe predict -v --model "$repo/models/bn_convnet.onnx" "$repo/models/samples" 2>&1 >/dev/null | head -1
echo "== 10,000 PNGs: cuda vs cpu (wall time, 16 cores)"
for d in cuda cpu; do
  TIMEFORMAT="$d: %R s wall"
  time python3 -m bnpipe predict -v --model "$repo/models/bn_convnet.onnx" --device $d --json --top-k 10 /tmp/png > /tmp/$d.jsonl
  TIMEFORMAT="one image, $d: %R s wall"
  time python3 -m bnpipe predict --model "$repo/models/bn_convnet.onnx" --device $d "$repo/models/samples/00000_7.png" > /dev/null
done
python3 - <<'PY'
import json
rows = {d: [json.loads(l) for l in open(f"/tmp/{d}.jsonl")] for d in ("cuda", "cpu")}
same = sum(a["label"] == b["label"] for a, b in zip(rows["cuda"], rows["cpu"]))
diff = max(abs(pa["probability"] - pb["probability"]) for a, b in zip(rows["cuda"], rows["cpu"])
           for pa, pb in zip(sorted(a["top_k"], key=lambda t: t["label"]), sorted(b["top_k"], key=lambda t: t["label"])))
acc = sum(r["label"] == r["path"].rsplit("_", 1)[1][0] for r in rows["cuda"]) / len(rows["cuda"])
print(f"labels equal: {same}/{len(rows['cpu'])}; max |probability diff| {diff:.2e}; cuda accuracy {acc:.4f}")
PY
echo "== torch imported by a CUDA prediction?"
python3 -c "
import sys
sys.argv = ['bnpipe', 'predict', '--model', '$repo/models/bn_convnet.onnx', '--device', 'cuda', '$repo/models/samples/00000_7.png']
from bnpipe.cli import main
try:
    main()
except SystemExit:
    pass
print('torch' in sys.modules, 'onnx' in sys.modules)"
