#!/usr/bin/env bash
# Issue 14's GPU measuring in one run on a lent device (docs/PERFORMANCE.md records it).
#
# Prepare once here, in the repo's root (.gpu/ is ignored through .git/info/exclude and
# travels because the call carries it; about 12 MB):
#   echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/whl .gpu/mnist .gpu/anchors
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform any -d .gpu/whl pyro-ppl==1.9.2 pyro-api==0.1.2 tomli-w==1.2.0
#   for f in ../shared/data/MNIST/raw/*; do gzip -c $f > .gpu/mnist/$(basename $f).gz; done
#   cp ../shared/anchors/*.py .gpu/anchors/
# Then one call of the device tool: command "bash benchmarks/gpu_session.sh",
# carry [".gpu"], timeout_s 570 (its steps' own limits add up to 550 s, so a slow one
# leaves the rest their time).
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYRO_VAE_DATA=/tmp/data
mkdir -p /tmp/data/MNIST/raw ../shared/anchors
for f in .gpu/mnist/*.gz; do gunzip -c "$f" > "/tmp/data/MNIST/raw/$(basename "$f" .gz)"; done
cp .gpu/anchors/*.py ../shared/anchors/
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__)" \
    | tee -a "$OUT/gpu.txt"

echo "== 1. every component and estimator, eager, traced and captured, against eager"
timeout 140 python3 benchmarks/gpu_check.py --data-dir /tmp/data --out /tmp/check --epochs 3 \
    > "$OUT/gpu_check.log" 2>&1
tail -5 "$OUT/gpu_check.log"
cp /tmp/check/gpu_check.json "$OUT/" 2>/dev/null

echo "== 2. images/s: pyro-vae eager, captured and inductor-captured, hand-written eager and in one CUDA graph, NumPyro"
timeout 230 python3 benchmarks/throughput.py --device cuda --quick --cudagraph \
    --numpyro-python python3 --data-dir /tmp/data --out "$OUT/throughput.json" \
    > "$OUT/throughput.log" 2>&1
grep -v Warning "$OUT/throughput.log" | tail -20

echo "== 3. MNIST, 10 epochs, default model: wall time with start-up and the final K=100 log p(x)"
for mode in cudagraph none; do
    start=$(date +%s%N)
    timeout 90 python3 -m pyro_vae train --dataset mnist --data-dir /tmp/data --epochs 10 \
        --device cuda --compile $mode --out /tmp/mnist-$mode --quiet 2>&1 | tail -3
    echo "--compile $mode: $(( ($(date +%s%N) - start) / 1000000 )) ms wall"
done 2>&1 | tee "$OUT/mnist.log"
