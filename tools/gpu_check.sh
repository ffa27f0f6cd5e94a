#!/usr/bin/env bash
# The one script for the GPU box: GPU tests, kernel benchmark, end-to-end decode figure.
#
# Run from the repository root with $OUT set (results land there, flat, at most 8 files):
#   env.txt            versions, GPU, wheel install log          gpu_tests.log   pytest tests/gpu tests/kernels
#   bench_kernels.md   kernel benchmark (markdown)               bench_kernels.csv   same, CSV
#   bench_kernels.log  benchmark console output / tracebacks     e2e.md          decode tok/s, triton vs torch
#   e2e.log            make-tiny + bench_e2e output              summary.txt     one line per step: status, seconds
# Every step has a timeout and its failure is recorded without stopping the next; the whole script
# stays within ~9.5 minutes. Wheels for missing packages (gguf, tokenizers, ...) go in .whl/ (no index), pytest-xdist
# and execnet among them: pyproject's pytest options name -n (the GPU tests run in 4 processes on the one GPU).
set -u
# The tree's own fingerprint (the box's copy of .git may be stale, so a commit name alone can be wrong): a digest
# of the source files' contents. `bash tools/gpu_check.sh --digest` prints it here, on a checkout, to match a run.
sources_digest() {
  find dsv4 tools tests notebooks pyproject.toml -type f \( -name '*.py' -o -name '*.sh' -o -name '*.json' \
    -o -name '*.toml' -o -name '*.ipynb' \) -not -path '*/results/*' -not -path '*/__pycache__/*' -print0 \
    | LC_ALL=C sort -z | xargs -0 sha1sum | sha1sum | cut -c1-12
}
if [ "${1:-}" = "--digest" ]; then sources_digest; exit 0; fi
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
TINY=/tmp/dsv4_flash4_q2.gguf

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME TIMEOUT_S LOGFILE CMD...: run with a timeout, append output to LOGFILE, record the status.
step() {
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$(date +%s)
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" >> "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=TIMEOUT
  [ $rc -ne 0 ] && [ "$status" = ok ] && status="FAIL(rc=$rc)"
  note "$(printf '%-14s %-12s %4ss  (elapsed %ss)' "$name" "$status" "$(( $(date +%s) - t0 ))" "$(( $(date +%s) - START ))")"
  return 0
}

# ---- environment -----------------------------------------------------------------------------------
{
  echo "date: $(date -u)"; echo "host: $(hostname)"; echo "pwd: $PWD"
  echo "commit: $(cat COMMIT 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "sources digest: $(sources_digest)  (bash tools/gpu_check.sh --digest on a checkout gives the same for the same tree)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || rocm-smi 2>&1 | head -20
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'hip', getattr(torch.version, 'hip', None), 'triton', triton.__version__)" 2>&1
} > "$OUT/env.txt" 2>&1

if ls .whl/*.whl >/dev/null 2>&1; then
  step wheels 120 "$OUT/env.txt" python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
else
  note "wheels         skipped      (no .whl/ folder)"
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export PYTHONDONTWRITEBYTECODE=1
python3 -c "import dsv4, dsv4.kernels_triton as k; print('dsv4 import ok; variants:', [v.op.value + ':' + v.name for v in k.variants()])" >> "$OUT/env.txt" 2>&1

# The 4-layer Flash-width q2 file is written on the CPU in the background while the GPU tests run.
COMMIT=$(cat COMMIT 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)  # COMMIT first: the box's .git may be stale
( timeout --kill-after=10 240 python3 -c "import sys; from dsv4.cli import main; sys.exit(main(sys.argv[1:]))" make-tiny "$TINY" --preset flash --layers 4 --recipe q2 \
    > "$OUT/e2e.log" 2>&1; echo "make-tiny rc=$?" >> "$OUT/e2e.log" ) &
MAKE_PID=$!

# ---- GPU tests (native, no interpreter) ------------------------------------------------------------
# -v: each result is logged as it happens, so a timeout still leaves a per-test record. -n 4: four processes share
# the GPU; the time goes to Triton compiles on the host (the same 296 pass / 8 skip in 98 s against 415-422 s in one
# process, tools/results/h200_final21/gpu_tests_n4.log), which keeps the script inside the device call's 600 s
step gpu_tests 470 "$OUT/gpu_tests.log" python3 -m pytest tests/gpu tests/kernels -m "cuda or not cuda" \
  -n 4 -v --tb=short -rfE --durations=15 -p no:cacheprovider

# ---- kernel benchmark ---------------------------------------------------------------------------------
# All shapes x T in {1, 4, 2048} with `auto`; every variant listed in BENCH_VARIANTS on the target shapes
# (the large Q8_0 matrices and the routed MoE) at T = 1 and 2048. The remaining registered variants
# were timed in earlier runs (tools/results/); all of them at once do not fit one device call.
BENCH_VARIANTS="${BENCH_VARIANTS:-auto gemv_rows gemv_rows_pf gemv_rows_pf_w2 gemv_rows_x1 gemv_rows_x2 gemv_rows_persist \
  gemv_gluon q8_int8 gemv_mma gemv_dot gemv_persist gemv_q8blk gemm_hybrid gemm_f16w gemm gemm_fp8 fused_blockdot fused_dot_pxs32 \
  int8 int8_triton int8_limb3 int8_n8 int8_base grouped grouped_v2 grouped_v2_f32 grouped_v2_m128 grouped_v2_n64 grouped_v2_triton grouped_v2_rega}"
step bench_kernels 270 "$OUT/bench_kernels.log" python3 tools/bench_kernels.py \
  --out-md "$OUT/bench_kernels.md" --out-csv "$OUT/bench_kernels.csv" --time-limit 240 --commit "$COMMIT" \
  --ops attn_q_b attn_output_a attn_output_b output moe_q2 moe_q4 --T 1 2048 --variants $BENCH_VARIANTS \
  --auto-everywhere

# ---- end-to-end decode: Flash-width 4-layer q2, triton (eager) vs torch reference ----------------------
wait "$MAKE_PID" 2>/dev/null
if [ -s "$TINY" ]; then
  REMAIN=$(( 590 - ($(date +%s) - START) ))
  [ $REMAIN -lt 60 ] && REMAIN=60
  step e2e "$REMAIN" "$OUT/e2e.log" python3 tools/bench_e2e.py "$TINY" --backends triton,triton+exact,torch --steps 32 \
    --time-limit $(( (REMAIN - 50) / 3 )) --out "$OUT/e2e.md"
else
  note "e2e            FAIL         (make-tiny produced no file; see e2e.log)"
fi
rm -f "$TINY"
note "total $(( $(date +%s) - START ))s"
exit 0
