# Sourced by the gpu_*_check.sh scripts on a lent GPU machine (torch with CUDA, no pip index there).
# Carried: .gpudeps (cp312 wheels: pytest, click, the server's and tritonclient's), .gpudata (MNIST, gzipped).
# Assembles the bnpipe package under /tmp/pkgs (the repo's stage folders are its subpackages) and cds to /tmp.
repo=$(pwd)
export PYTHONPATH=/tmp/site:/tmp/pkgs:${PYTHONPATH:-}
if [ -d .gpudeps ] && [ ! -e /tmp/site/.bnpipe-deps ]; then
  python3 -m pip install -q --no-deps --target /tmp/site .gpudeps/*.whl 2>&1 | grep -v WARNING | tail -3
  touch /tmp/site/.bnpipe-deps
fi
mkdir -p /tmp/pkgs/bnpipe /tmp/data/MNIST/raw
cp bnpipe/*.py /tmp/pkgs/bnpipe/
for stage in train export serve; do ln -sfn "$repo/$stage" "/tmp/pkgs/bnpipe/$stage"; done
ln -sfn "$repo/tests" /tmp/pkgs/tests
for f in .gpudata/*.gz; do
  [ -e "/tmp/data/MNIST/raw/$(basename "$f" .gz)" ] || gunzip -c "$f" > "/tmp/data/MNIST/raw/$(basename "$f" .gz)"
done
cd /tmp  # so that `bnpipe` is the assembled package, not the repo folder of that name
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
