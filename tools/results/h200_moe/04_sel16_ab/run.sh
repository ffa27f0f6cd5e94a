#!/usr/bin/env bash
# One-off A/B on the GPU box: IQ2_XXS 512-byte selector table (this tree) vs the 1 KiB / 2 KiB grids (ab_old = HEAD).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD; unset TRITON_INTERPRET; export PYTHONDONTWRITEBYTECODE=1
NEW=$(cat COMMIT); OLD=$(cat ab_old/COMMIT)
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv; python3 -c "import torch,triton;print(torch.__version__,triton.__version__)"; } > $OUT/env.txt 2>&1
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_iq2_selectors.py tests/kernels/test_triton_moe_int8.py tests/kernels/test_triton_moe_prefill.py tests/gpu/test_triton_gpu.py -k "moe or iq2 or selector" > $OUT/gpu_tests.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests.log
tail -3 $OUT/gpu_tests.log
for i in 1 2; do
  for v in old new; do
    if [ $v = old ]; then S=ab_old/tools/bench_kernels.py; C=$OLD; else S=tools/bench_kernels.py; C=$NEW; fi
    echo "=== $v $i $(date -u +%T)" >> $OUT/ab.log
    timeout 200 python3 $S --ops moe_q2 moe_q4 --T 1 2048 --variants auto int8 int8_rf int8_rf16 --commit $C --out-md $OUT/ab_${v}_$i.md >> $OUT/ab.log 2>&1
    echo "rc=$?" >> $OUT/ab.log
    grep -E "moe_q[24] .*\| (auto|int8) " $OUT/ab_${v}_$i.md | cut -d'|' -f2-13
  done
done
