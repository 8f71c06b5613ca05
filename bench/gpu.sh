#!/usr/bin/env bash
# The GPU benchmark, as run on a lent GPU machine (one call, results under $OUT):
#
#   bash bench/gpu.sh            # carry: .whl .gpu/chunk0 .gpu/model .gpu/cpu_reference.npz
#   SWEEP=6,14 bash bench/gpu.sh # also builds with 6 and 14 decoding workers
#   POSTERS=2048 bash bench/gpu.sh  # builds of 512 and 2,048 posters (default 256 and 1,024)
#
# .gpu/chunk0 holds 2,500 real posters (manifest.csv, labels.csv); .gpu/model a model trained on
# the CPU (fusion train needs scikit-learn, which that machine lacks); .gpu/cpu_reference.npz CPU
# features of 48 of those posters (bench/make_reference.py) for bench/gpu_check.py.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
SKIP=help,train
if ! python3 -c "import sklearn" 2>/dev/null; then
  # posterfusion.predict imports the training module, which imports scikit-learn's metrics; predict
  # never calls them. Stand-ins let predict run here (its cold start then lacks sklearn's ~1.2 s).
  mkdir -p /tmp/stub/sklearn
  echo "" > /tmp/stub/sklearn/__init__.py
  printf 'def _missing(*a, **k):\n    raise ImportError("scikit-learn is not installed")\naverage_precision_score = f1_score = precision_recall_fscore_support = _missing\n' > /tmp/stub/sklearn/metrics.py
  export PYTHONPATH=$PYTHONPATH:/tmp/stub
  echo "scikit-learn missing: stubbed for predict" | tee "$OUT/notes.txt"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1
timeout 60 python3 bench/gpu_check.py --reference .gpu/cpu_reference.npz --root .gpu/chunk0 \
  --json "$OUT/gpu_check.json" > "$OUT/gpu_check.log" 2>&1
python3 bench/run.py --device cuda --manifest .gpu/chunk0/manifest.csv --model .gpu/model \
  --posters "${POSTERS:-1024}" --skip "$SKIP" ${SWEEP:+--sweep-workers $SWEEP} --json "$OUT/gpu.json" \
  > "$OUT/gpu_table.md" 2> "$OUT/gpu_bench.log"
cat "$OUT/gpu_check.log" | grep -v Warn | tail -3
cat "$OUT/gpu_table.md"
grep -v Warn "$OUT/gpu_bench.log" | tail -8
