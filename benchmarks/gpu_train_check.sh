#!/usr/bin/env bash
# Issue 9 on a lent GPU: the CUDA-graph step against eager (tests and benchmarks/cuda_train.py), and
# torchrun with --bn sync on NCCL. Carry .gpudeps and .gpudata (see gpu_setup.sh).
#   bash benchmarks/gpu_train_check.sh
set -u
source benchmarks/gpu_setup.sh
echo "== pytest tests/test_graphed.py (CUDA graph replays against the eager loop)"
timeout 120 python3 -m pytest -q -p no:cacheprovider --rootdir "$repo" "$repo/tests/test_graphed.py" 2>&1 | tail -4
echo "== benchmarks/cuda_train.py: the 5-epoch recipe, eager vs graph, 2 rounds"
timeout 150 python3 "$repo/benchmarks/cuda_train.py" --data /tmp/data --rounds 2 2>&1 | grep -v "^  \|Warning\|warn("
echo "== torchrun --nproc-per-node 1 --bn sync: NCCL and nn.SyncBatchNorm (1 epoch, precise BN)"
timeout 120 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m bnpipe train --device cuda --bn sync \
    --epochs 1 --precise-bn 50 --data /tmp/data --out /tmp/m/sync.pt 2>&1 | grep -v Warning | tail -3
python3 -c "
import torch
c = torch.load('/tmp/m/sync.pt', weights_only=True)
print('arch bn:', c['arch']['bn'], ' resume epoch:', c['resume']['epoch'], ' test_acc:', c['metrics'][-1]['test_acc'])"
echo "== torch.compile(mode='reduce-overhead') of the net instead, eager loop (at most 150 s)"
timeout 150 python3 "$repo/benchmarks/cuda_train.py" --data /tmp/data --rounds 1 --ways compile 2>&1 | grep -v "^  \|Warning\|warn(" | tail -4
