#!/usr/bin/env bash
# One GPU session's checks and benchmarks (docs/benchmarks.md records the results): throughput against the
# transformers Trainer (llama-1b, smollm2-360m; each with a profiled step after the timed ones: where the time
# goes), the GPU tests (no host sync per step, prefetch, profiling, Liger), and cpt at a larger micro-batch: llama-1b
# as is, with larger loss chunks, with Liger's layer kernels; smollm2-360m at 16 (the chunked-loss memory benchmark
# with T_LOSS=40). Every part has its own time
# limit, so a slow part never costs the others. Output: $OUT (default /tmp/cpt-gpu), one log + JSON per part.
#   bash scripts/gpu_session.sh            (from the repository root; wheels in .whl/ are installed first if present)
# All parts take about 12-13 minutes of a warm H100, more than one device call's 600 s: run it as two calls on the
# same warm machine, e.g.  T_MB8=0 T_MB8C=0 T_LIGER=0 T_SMOL16=0 bash scripts/gpu_session.sh  then
# T_LLAMA=0 T_SMOL=0 T_TESTS=0 bash scripts/gpu_session.sh  (a part's limit of 0 skips it).
set -uo pipefail
OUT=${OUT:-/tmp/cpt-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
WHEELS=${WHEELS:-.whl}  # wheels the GPU machine lacks (pydantic, liger-kernel), installed first when present
if [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
bench="python3 scripts/bench_throughput.py --warmup ${WARMUP:-3} --steps ${STEPS:-5} --workdir /tmp/cpt-bench"
part() {  # part NAME SECONDS COMMAND...   (SECONDS=0 skips the part)
  local name=$1 secs=$2; shift 2
  if [ "$secs" = 0 ]; then echo "=== $name: skipped"; return; fi
  echo "=== $name (limit ${secs}s)"; local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  tail -n 12 "$OUT/$name.log"; echo "=== $name: exit $rc in $((SECONDS - t0))s"
}
# (--cpt-profile: one more cpt step after the timed ones under torch.profiler; its kernel table goes to $OUT/profile)
part llama1b ${T_LLAMA:-190} $bench --shapes llama-1b --json "$OUT/llama1b.json" --cpt-profile "$OUT/profile"
part smollm2 ${T_SMOL:-160} $bench --shapes smollm2-360m --json "$OUT/smollm2.json" --cpt-profile "$OUT/profile"
part gpu_tests ${T_TESTS:-300} python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py
# (recorded on 2026-11-26; T_LOSS=40 runs it again)
part bench_loss ${T_LOSS:-0} python3 scripts/bench_loss.py --device cuda --dtype bf16 --repeats 2
part llama1b_mb8 ${T_MB8:-100} $bench --shapes llama-1b --frameworks cpt --micro-batch 8 --json "$OUT/llama1b_mb8.json"
# toward the 50% MFU target: fewer, larger loss chunks (each chunk adds one pass over the fp32 lm_head gradient)
part llama1b_mb8_chunk4k ${T_MB8C:-100} $bench --shapes llama-1b --frameworks cpt --micro-batch 8 \
  --cpt-set train.loss_chunk_tokens=4096 --json "$OUT/llama1b_mb8_chunk4k.json"
# Liger's Triton kernels for the layers (RMSNorm, RoPE, SwiGLU), the loss still cpt's chunked loss: against llama1b_mb8
part llama1b_mb8_liger ${T_LIGER:-110} $bench --shapes llama-1b --frameworks cpt --micro-batch 8 --cpt-liger \
  --json "$OUT/llama1b_mb8_liger.json"
# toward 1.7x at 360M: micro batch 8 peaks at 28 GB with the chunked loss, so 16 fits (hidden 960: small matmuls and
# per-kernel overheads weigh more, larger batches amortise them); the Trainer's figure is the smollm2 part's
part smollm2_mb16 ${T_SMOL16:-90} $bench --shapes smollm2-360m --frameworks cpt --micro-batch 16 \
  --json "$OUT/smollm2_mb16.json"
