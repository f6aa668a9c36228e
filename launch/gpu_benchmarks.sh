#!/usr/bin/env bash
# The speed issue's measurements on one lent GPU, as one script that ends within $BUDGET
# seconds whatever hangs or fails: every step runs under `timeout`, logs to $OUT/<step>.log,
# appends its JSON lines (tagged with "step") and a status line to $OUT/results.jsonl, and
# the script goes on. Steps run in order of value; those the budget no longer allows are
# recorded as skipped. A summary table is printed at the end.
#
#   Here, first (network):  ../shared/device/wheels.sh .whl   # py3.12 wheels the GPU image lacks
#   On the GPU:             run(command="bash launch/gpu_benchmarks.sh", carry=[".whl"], timeout_s=600)
#   CPU rehearsal:          SMOKE=1 OUT=/tmp/gpu_smoke bash launch/gpu_benchmarks.sh
#
# Options (environment): OUT (default $PWD/gpu_out), BUDGET (seconds, default 540; 2400 with
# SMOKE), ONLY="step names or prefixes" to run a subset (e.g. ONLY="a_ d_profile_clip"),
# PEAK_TFLOPS (default 989: H100/H200 SXM dense bf16), XLA_FLAGS_EXTRA (appended to
# XLA_FLAGS, empty by default: an XLA flag this jaxlib does not know aborts every step).
set -u
cd "$(dirname "$0")/.."
SMOKE=${SMOKE:-0}
OUT=${OUT:-$PWD/gpu_out}
BUDGET=${BUDGET:-$([ "$SMOKE" = 1 ] && echo 2400 || echo 540)}
ONLY=${ONLY:-}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
START=$(date +%s)
RESERVE=15  # seconds kept for the summary

export XLA_FLAGS="${XLA_FLAGS:-}${XLA_FLAGS_EXTRA:+ $XLA_FLAGS_EXTRA}"
# One persistent compilation cache for every step (a program compiled once, e.g. by the
# step benchmark, is not compiled again by the profile); under $OUT as the issue asks,
# emptied at the end so that the results come back small.
export XDG_CACHE_HOME=$OUT/xdg_cache
export JAX_COMPILATION_CACHE_DIR=$XDG_CACHE_HOME/jax

if [ "$SMOKE" = 1 ]; then
  # CPU rehearsal: the same command lines on tiny configs, the GPU-only steps skipped.
  PY=${PY:-python}
  CLIP=configs/clip.py; CLIP_BATCH=16; COCA=configs/coca.py; COCA_BATCH=16
  STEP_ARGS="--steps=2 --matmul_size=256"; PROFILE_STEPS=1
  ATTENTION_VARIANTS="einsum xla"  # cudnn refuses to run on a CPU, by design
  BATCH_TRIES="32 64"; OPENCLIP="--model=tiny_clip --batch=16 --steps=2 --warmup=1"
  E2E_ARGS="--config.total_steps=4 --config.log_every=2 --config.eval_every=4 --config.checkpoint_every=4
            --config.batch_size=16 --config.data.num_eval=32 --config.eval.batch_size=16"
  PEAK_TFLOPS=""
else
  PY=${PY:-python3}
  CLIP=configs/clip.py:vit_b16; CLIP_BATCH=256; COCA=configs/coca.py:base; COCA_BATCH=128
  STEP_ARGS=""; PROFILE_STEPS=3
  ATTENTION_VARIANTS="einsum"  # the default, auto, is cuDNN wherever it runs
  BATCH_TRIES="512 1024 2048"; OPENCLIP="--model=clip_b16 --batch=256"
  # One CPU core renders ~2,000 embedded examples/s: the default's 1,600 steps of 128 would
  # wait on it for ~100 s. Four grain workers keep ahead of the GPU (the model is the same).
  E2E_ARGS="--config.data.worker_count=4"
fi

elapsed() { echo $(( $(date +%s) - START )); }

wanted() {  # is step $1 selected by ONLY?
  [ -z "$ONLY" ] && return 0
  local p; for p in $ONLY; do case "$1" in "$p"*) return 0;; esac; done
  return 1
}

record() {  # name status seconds rc: one status line in results.jsonl
  echo "{\"step\": \"$1\", \"status\": \"$2\", \"seconds\": $3, \"rc\": $4}" >> "$RESULTS"
  printf '%-34s %-8s %4ss\n' "$1" "$2" "$3"
}

collect() {  # name: the JSON objects its log printed, tagged with the step's name
  "$PY" - "$1" "$OUT/$1.log" "$RESULTS" <<'EOF'
import json, sys
name, log, results = sys.argv[1:]
with open(log, errors="replace") as f, open(results, "a") as out:
    for line in f:
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                out.write(json.dumps({"step": name, **row}) + "\n")
EOF
}

run_step() {  # name timeout_s command...: run it under the smaller of timeout_s and what the budget has left
  local name=$1 limit=$2; shift 2
  wanted "$name" || return 0
  local left=$(( BUDGET - RESERVE - $(elapsed) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then record "$name" skipped 0 -1; return 1; fi
  local t0=$(date +%s)
  echo "\$ $*" > "$OUT/$name.log"
  timeout -k 10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  local rc=$? status=ok
  [ $rc -ne 0 ] && status=failed
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && status=timeout
  collect "$name"
  record "$name" $status $(( $(date +%s) - t0 )) $rc
  [ $rc -eq 0 ]
}

# --- setup: wheels, versions, the device --------------------------------------------------------
setup() {
  if [ "$SMOKE" != 1 ]; then
    if ls .whl/*.whl > /dev/null 2>&1; then
      "$PY" -m pip install -q --no-index --no-deps --target /tmp/mmjax_site .whl/*.whl
    else
      echo "no .whl/: run ../shared/device/wheels.sh .whl here first and carry it: steps needing grain etc. will fail"
    fi
  fi
  nvidia-smi || true
  "$PY" - <<'EOF'
import json, platform
from importlib import metadata
versions = {"python": platform.python_version()}
for name in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint",
             "grain", "ml-collections", "torch", "open-clip-torch"):
    try:
        versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        versions[name] = None
import jax
print(json.dumps({"name": "environment", **versions, "devices": [d.device_kind for d in jax.devices()]}))
EOF
  echo "XLA_FLAGS=$XLA_FLAGS"
}
export PYTHONPATH=/tmp/mmjax_site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export -f setup; export SMOKE PY  # `timeout` runs programs: the function runs in a child bash
run_step setup 90 bash -c setup

# The step benchmark takes --peak_tflops where another change has added it; the config key
# exists either way.
PEAK_ARG=""
if [ -n "$PEAK_TFLOPS" ]; then
  PEAK_ARG="--config.peak_tflops=$PEAK_TFLOPS"
  "$PY" -m mmjax.benchmarks.step --helpfull 2>/dev/null | grep -q -- "--peak_tflops" && PEAK_ARG="--peak_tflops=$PEAK_TFLOPS"
fi
PROFILE_PEAK=${PEAK_TFLOPS:+--peak_tflops=$PEAK_TFLOPS}

STEP=("$PY" -m mmjax.benchmarks.step $STEP_ARGS $PEAK_ARG)
PROFILE=("$PY" -m mmjax.benchmarks.profile --steps=$PROFILE_STEPS $PROFILE_PEAK)

# (a) the train step at the issue's batch sizes, the configs' defaults (bf16 on the GPU)
run_step a_step_clip_b16 120 "${STEP[@]}" --config=$CLIP --config.batch_size=$CLIP_BATCH
run_step a_step_coca_base 150 "${STEP[@]}" --config=$COCA --config.batch_size=$COCA_BATCH
# (d) where the time goes
run_step d_profile_clip_b16 100 "${PROFILE[@]}" --config=$CLIP --config.batch_size=$CLIP_BATCH --out=$OUT/profile_clip_b16
run_step d_profile_coca_base 120 "${PROFILE[@]}" --config=$COCA --config.batch_size=$COCA_BATCH --out=$OUT/profile_coca_base
# (c) open_clip in the same process (eager AMP bf16 and torch.compile on a GPU): jax must
# not take 75% of the memory up front, torch needs its share
XLA_PYTHON_CLIENT_PREALLOCATE=false run_step c_vs_openclip 180 "$PY" -m mmjax.benchmarks.vs_openclip $OPENCLIP
# (e) the default embedded CoCa end to end, then again in a fresh workdir with the cache warm
run_step e_coca_e2e_cold 120 "$PY" -m mmjax.main --config=configs/coca.py --workdir=$OUT/coca_e2e $E2E_ARGS
run_step e_coca_e2e_cached 120 "$PY" -m mmjax.main --config=configs/coca.py --workdir=$OUT/coca_e2e_cached $E2E_ARGS
# (b) what the options cost or save: rematerialisation, scanned layers (compile time), attention kernels
for model in clip coca; do
  if [ $model = clip ]; then config=$CLIP; batch=$CLIP_BATCH; else config=$COCA; batch=$COCA_BATCH; fi
  # The configs' remat=auto is "none" in the step benchmark (what the trainer takes where it fits): time dots too.
  run_step b_${model}_remat_dots 100 "${STEP[@]}" --config=$config --config.batch_size=$batch --config.model.remat=dots
  run_step b_${model}_no_scan 120 "${STEP[@]}" --config=$config --config.batch_size=$batch --config.model.scan_layers=False
  for impl in $ATTENTION_VARIANTS; do
    run_step b_${model}_attention_$impl 100 "${STEP[@]}" --config=$config --config.batch_size=$batch --config.model.attention=$impl
  done
done
# (f) the largest CLIP B/16 batch that fits: double until a step fails
for batch in $BATCH_TRIES; do
  XLA_PYTHON_CLIENT_MEM_FRACTION=.95 run_step f_clip_batch_$batch 100 "${STEP[@]}" --config=$CLIP --config.batch_size=$batch || break
done
# (g) cuDNN attention against einsum, on the GPU
if [ "$SMOKE" != 1 ]; then
  # tests/conftest.py defaults JAX_PLATFORMS to cpu; the cuDNN cases need the GPU (the f32 CPU cases skip there).
  JAX_PLATFORMS=cuda run_step g_test_attention 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_attention.py
fi

# --- leave results, not caches and checkpoints ----------------------------------------------------
du -sh "$XDG_CACHE_HOME" "$OUT"/coca_e2e* "$OUT"/profile_*/trace 2>/dev/null > "$OUT/sizes.txt"
rm -rf "$XDG_CACHE_HOME" "$OUT"/coca_e2e*/checkpoints
find "$OUT" -path '*/trace/*' -size +40M -delete 2>/dev/null  # a GPU trace can outgrow what comes back

"$PY" - "$RESULTS" "$(elapsed)" <<'EOF'
import json, sys
KEYS = ("examples_per_sec", "mfu", "compile_seconds", "step_seconds", "analytic_tflops", "ratio")
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"\nsummary ({sys.argv[2]} s in all; details in results.jsonl and <step>.log)\n")
print("| step | status | s | figures |\n|---|---|---:|---|")
for status in (r for r in rows if "status" in r):
    figures = []
    for r in rows:
        if r.get("step") == status["step"] and "status" not in r:
            shown = {k: r[k] for k in KEYS if isinstance(r.get(k), (int, float))}
            if shown:
                label = r.get("framework") or r.get("name") or ""
                figures.append(label + " " + ", ".join(f"{k} {v:.3g}" for k, v in shown.items()))
    print(f"| {status['step']} | {status['status']} | {status['seconds']} | {'; '.join(figures[:3])} |")
EOF
