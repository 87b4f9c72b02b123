#!/usr/bin/env bash
# Issue 7 on a lent GPU: benchmarks/serve.py --device cuda, bnpipe serve against --max-batch-size 1.
# Before: ../shared/gpu/split_wheel.sh here, and calls carrying .gpuwheel/p00 .. p03 (and .gpudeps,
# .gpudata); this script runs carrying the last piece and models (models/bn_convnet.onnx).
set -u
cat .gpuwheel/p*/part > /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
python3 -m pip install -q --no-deps --target /tmp/ort /tmp/onnxruntime_gpu-*.whl 2>&1 | grep -v WARNING | tail -2
source benchmarks/gpu_setup.sh
export PYTHONPATH=/tmp/ort:$PYTHONPATH  # before the image's CPU-only onnxruntime
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_device(), o.get_available_providers())"
timeout 60 python3 "$repo/benchmarks/ort_shapes.py" --model "$repo/models/bn_convnet.onnx" --device cuda
# 6 load generators: the machine has 16 cores, and 2 tritonclient processes would cap the servers
timeout 240 python3 "$repo/benchmarks/serve.py" --model "$repo/models/bn_convnet.onnx" --data /tmp/data --device cuda \
    --only "bnpipe serve" bare --rounds 2 --generators 6 --ready-repeats 2 2>&1 | tail -25
