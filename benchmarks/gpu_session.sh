#!/usr/bin/env bash
# Every GPU figure of the open issues in one call of the lent device machine (15 minutes a
# session, start included). Default steps, in order of what issue 3 still lacks: the CUDA tests
# (fused objectives and their Triton kernel, search, the train stage compiled end to end in both
# train.compile modes), the objective alone (objective_speed.py: Triton pass vs torch ops vs
# compiled), train speed at 28 px then 105 px, eager and with train.compile true and
# reduce-overhead (objective share of the step, ratios to the limit and the reference). Each runs
# under a time box cut to what is left of BUDGET_S, so a slow or broken step costs only its own
# figures; at BUDGET_S=545 the 105 px step gets what the others leave. Opt-in (named): evaluation
# speed, eager-only train speed, the Omniglot GPU preset.
#
# It expects, in the repository root (ignored by git via .git/info/exclude, named in `carry`;
# benchmarks/gpu_prepare.sh makes both and checks the imports, at no device time):
#   .whl/      the Python packages the machine's image lacks (pydantic, pytorch-metric-learning,
#              faiss-cpu, mlflow-skinny and what it imports), as py3.12 manylinux wheels
#   .devdata/  the Omniglot zips (images_background, images_evaluation, all_runs)
# and writes under $OUT: results.jsonl (every JSON figure line) and log.txt (everything).
#
#   COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_session.sh [BUDGET_S] [STEP ...]
# (the copy there has no git); STEPs name the steps to run (default: all but the opt_* ones).
set -u
BUDGET_S=${1:-540}
shift $(($# > 0 ? 1 : 0))
ONLY=" $* "
START=$(date +%s)
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
DATA=$PWD/.devdata

# step NAME MAX_S CMD...: run CMD under min(MAX_S, time left), log it, keep its JSON lines.
step() {
  local name=$1 max=$2 left
  shift 2
  if [ "$ONLY" = "  " ]; then [[ $name == opt_* ]] && return; else [[ $ONLY == *" $name "* ]] || return; fi
  left=$((BUDGET_S - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then echo "=== $name: skipped (${left}s left)" | tee -a "$OUT/log.txt"; return; fi
  [ "$max" -gt "$left" ] && max=$left
  echo "=== $name (limit ${max}s, $(( $(date +%s) - START ))s in)" | tee -a "$OUT/log.txt"
  timeout -k 10 "$max" "$@" 2>&1 | tee -a "$OUT/log.txt" | grep --line-buffered '^{"figure"' | sed "s/^{/{\"step\": \"$name\", /" >>"$OUT/results.jsonl"
  echo "=== $name: rc ${PIPESTATUS[0]}, $(( $(date +%s) - START ))s in" | tee -a "$OUT/log.txt"
}

echo "=== commit ${COMMIT:-unknown}, budget ${BUDGET_S}s" | tee -a "$OUT/log.txt"
step gpu 20 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,memory.total,utilization.gpu --format=csv
step cuda_tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_search.py tests/test_objectives.py tests/test_triplet_kernel.py tests/test_train.py tests/test_resume.py -k "cuda"
step objective 60 python3 benchmarks/objective_speed.py --batches 128 512 1024 --compile
step train_speed_28 240 python3 benchmarks/train_speed.py --data "$DATA" --image-size 28 --p 128 --k 4 --epochs 3 --workers 8 --compile true reduce-overhead
step train_speed_105 200 python3 benchmarks/train_speed.py --data "$DATA" --image-size 105 --p 128 --k 4 --epochs 2 --workers 8 --compile reduce-overhead
step opt_eval_compare 60 python3 benchmarks/eval_speed.py --repeats 3
step opt_eval_scale 120 python3 benchmarks/eval_speed.py --mode scale --gallery 1000000 --queries 100000 --query-chunk 8192 --gallery-block 262144
step opt_train_speed_28_eager 150 python3 benchmarks/train_speed.py --data "$DATA" --image-size 28 --p 128 --k 4 --epochs 3 --workers 8
step opt_omniglot_gpu_seed0 330 python3 benchmarks/omniglot_quality.py --data "$DATA" --preset params/omniglot-gpu.yaml --rows nt-xent --seeds 0 --workdir /tmp/og0
cp /tmp/og0/metrics.json "$OUT/omniglot_gpu_seed0_metrics.json" 2>/dev/null
step gpu_after 20 nvidia-smi --query-gpu=name,clocks.sm,memory.used,utilization.gpu --format=csv
echo "=== done in $(( $(date +%s) - START ))s"
cat "$OUT/results.jsonl"
