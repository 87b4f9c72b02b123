#!/usr/bin/env bash
# `bnpipe train --device cuda` on a lent GPU machine (torch with CUDA, no pip index there).
# Carry: .gpudeps (wheels for what the image may lack) and .gpudata (MNIST raw files, gzipped).
#   bash benchmarks/gpu_train_check.sh
set -u
repo=$(pwd)
export PYTHONPATH=/tmp/site:/tmp/pkgs:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 - <<'PY'
import glob, importlib, subprocess, sys
need = {"click": "click", "tqdm": "tqdm", "numpy": "numpy", "PIL": "pillow", "matplotlib": "matplotlib",
        "torchvision": "torchvision"}
deps = ["contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "python_dateutil", "packaging", "tzdata"]
missing = []
for module, dist in need.items():
    try:
        importlib.import_module(module)
    except Exception as exc:
        print(f"missing {module}: {type(exc).__name__}")
        missing.append(dist)
        if dist == "matplotlib":
            missing += deps
wheels = [w for d in missing for w in glob.glob(f".gpudeps/{d}-*.whl")]
if wheels:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", "/tmp/site", *wheels], check=True)
PY
mkdir -p /tmp/pkgs/bnpipe /tmp/data/MNIST/raw
cp bnpipe/*.py /tmp/pkgs/bnpipe/
for stage in train export serve; do ln -sfn "$repo/$stage" "/tmp/pkgs/bnpipe/$stage"; done
for f in .gpudata/*.gz; do gunzip -c "$f" > "/tmp/data/MNIST/raw/$(basename "$f" .gz)"; done
cd /tmp  # so that `bnpipe` is the assembled package, not the repo folder of that name
python3 -c "import sys, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'torchvision', torchvision.__version__)"
python3 -c "from bnpipe.train.recipe import resolve_device; print('auto ->', resolve_device('auto'))"
echo "== bnpipe train --device cuda (5 epochs, default recipe)"
time python3 -m bnpipe train --device cuda --data /tmp/data --out /tmp/m/cuda.pt
echo "== same seed again on cuda, 1 epoch x2: identical weights?"
python3 -m bnpipe train --device cuda --data /tmp/data --epochs 1 --out /tmp/m/a.pt > /dev/null
python3 -m bnpipe train --device cuda --data /tmp/data --epochs 1 --out /tmp/m/b.pt > /dev/null
python3 -c "
import torch
a, b = (torch.load(p, weights_only=True)['state_dict'] for p in ('/tmp/m/a.pt', '/tmp/m/b.pt'))
print('identical:', all(torch.equal(a[k], b[k]) for k in a), ' max diff:', max((a[k].double() - b[k].double()).abs().max().item() for k in a))"
ls -la /tmp/m
echo "== torchrun --nproc-per-node 1 --bn sync: NCCL and nn.SyncBatchNorm (1 epoch)"
python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m bnpipe train --device cuda --bn sync --epochs 1 \
    --precise-bn 50 --data /tmp/data --out /tmp/m/sync.pt
python3 -c "
import torch
c = torch.load('/tmp/m/sync.pt', weights_only=True)
print('arch bn:', c['arch']['bn'], ' resume epoch:', c['resume']['epoch'], ' test_acc:', c['metrics'][-1]['test_acc'])"
