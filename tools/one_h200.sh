export NCCL_NVLS_ENABLE=0
# Issue #11 on ONE GPU (world size 1: nothing crosses ranks; the 2-GPU table waits for a 2-GPU
# machine). Runs, each under its own time limit (about 6 minutes in all on one H200):
#   1. the GPU tests of this work (those needing 2 GPUs skip themselves);
#   2. the graph engine on `none` (no EPLB), with and without the fake scheduler's host work:
#      steady p99/p50 acceptance (<= 1.05), printed; the Python engine on `none` beside it;
#      the graph engine in process mode with --verify;
#   3. the bench at world size 1 with --runs 3 (graph engine);
#   4. tools/copy_bench.py (commit, agreement, cuda_ipc pull microbenchmarks).
# Usage, from anywhere: OUT=/some/dir bash tools/one_h200.sh   (logs and results under $OUT;
# put pyzmq on PYTHONPATH first if it is carried as a wheel). Exit 1 if any part failed.
set -u
: "${OUT:?set OUT to the directory for logs and results}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
failed=0

part() {  # part NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, show its tail
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0)) s"
  tail -n 20 "$OUT/$name.log"
  [ "$rc" -eq 0 ] || failed=1
}

# Per-rank work of the 2-GPU DeepSeek-V3-scaled preset on one GPU: 36 slots of 84 MiB bf16.
SHAPE=(--layers 6 --experts 32 --redundant 4 --hidden 7168 --inter 2048 --top-k 8 --tokens 512
       --dtype bfloat16)

part gpu_tests 60 python -m pytest -q -m gpu -k "not two_gpus" tests/mp_eplb/demo/test_graph.py \
  tests/mp_eplb/demo/test_engine.py tests/mp_eplb/test_state.py tests/mp_eplb/test_transfer.py

acceptance() {  # acceptance LOG: steady p99/p50 of a demo log against 1.05
  python - "$1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
m = re.search(r"steady steps: p50 ([\d.]+) ms, p99 ([\d.]+) ms", text)
if m:
    p50, p99 = map(float, m.groups())
    verdict = "MET" if p99 / p50 <= 1.05 else "NOT MET"
    print(f"   ACCEPTANCE {sys.argv[1]}: steady p99/p50 = {p99 / p50:.3f} (<= 1.05: {verdict}); "
          f"p50 {p50:.2f} ms, p99 {p99:.2f} ms")
else:
    print(f"   ACCEPTANCE {sys.argv[1]}: no steady line in the log")
PY
}

part graph_none 60 python -m mp_eplb demo --device cuda --ranks 1 --mode none --engine graph \
  --steps 500 "${SHAPE[@]}" --quiet
acceptance "$OUT/graph_none.log"
part graph_none_no_scheduler 50 python -m mp_eplb demo --device cuda --ranks 1 --mode none \
  --engine graph --no-scheduler --steps 500 "${SHAPE[@]}" --quiet
acceptance "$OUT/graph_none_no_scheduler.log"

part python_none 40 python -m mp_eplb demo --device cuda --ranks 1 --mode none --engine python \
  --steps 100 "${SHAPE[@]}" --quiet

part graph_verify 40 python -m mp_eplb demo --device cuda --ranks 1 --mode process --engine graph \
  --verify --steps 120 --rebalance-interval 30 --drift-interval 15 --layers 3 --experts 16 \
  --redundant 4 --hidden 1024 --inter 512 --top-k 4 --tokens 128 --dtype bfloat16 \
  --capacity-factor 20 --quiet

part bench 150 python -m mp_eplb bench --device cuda --ranks 1 --engine graph --runs 3 --no-micro \
  --configs none:200,process-cuda_ipc:200 "${SHAPE[@]}" --out "$OUT/bench"

part copy_bench 60 python tools/copy_bench.py --out "$OUT/copy_bench"

echo "== done: logs and results under $OUT (failed=$failed)"
exit "$failed"
