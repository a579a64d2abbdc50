#!/usr/bin/env bash
# One GPU session's checks and benchmarks (docs/benchmarks.md records the results), in priority order, so that one
# device call of under 10 minutes does what its time allows: the quick GPU tests (no host sync per step, prefetch,
# profiling, Liger), the shipped launchers on the GPU, throughput against the transformers Trainer (llama-1b,
# smollm2-360m; cpt at the larger micro batch its chunked loss allows, with the per-layer compile; a profiled 1B step
# after the timed ones: where the time goes), then the whole-model compile and the rest. Every part has its own time
# limit, and BUDGET (seconds, default 560) caps the whole: a part gets at most what is left and is skipped under 30 s.
# Output: $OUT (default /tmp/cpt-gpu): results.tgz (every part's log and JSON, the profiled steps' kernel tables)
# and the profiled steps' traces beside it (few files: a device call brings back at most 8).
#   bash scripts/gpu_session.sh            (from the repository root; wheels in .whl/ are installed first if present)
# A part's limit of 0 skips it, e.g.  T_TESTS=0 T_LAUNCH=0 bash scripts/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/cpt-gpu}
BUDGET=${BUDGET:-560}
R=$OUT/r  # every part's files, packed into $OUT/results.tgz at the end
mkdir -p "$R"
T0=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
WHEELS=${WHEELS:-.whl}  # wheels the GPU machine lacks (pydantic, liger-kernel), installed first when present
if [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$R/device.txt"
bench="python3 scripts/bench_throughput.py --warmup ${WARMUP:-3} --steps ${STEPS:-5} --workdir /tmp/cpt-bench"
part() {  # part NAME SECONDS COMMAND...   (SECONDS=0 skips the part)
  local name=$1 secs=$2; shift 2
  if [ "$secs" = 0 ]; then echo "=== $name: skipped"; return; fi
  local left=$((BUDGET - (SECONDS - T0)))
  if [ "$left" -lt 30 ]; then echo "=== $name: skipped (${left}s of BUDGET left)"; return; fi
  [ "$secs" -gt "$left" ] && secs=$left
  echo "=== $name (limit ${secs}s)"; local t0=$SECONDS
  timeout "$secs" "$@" > "$R/$name.log" 2>&1; local rc=$?
  tail -n 8 "$R/$name.log"; echo "=== $name: exit $rc in $((SECONDS - t0))s"
}
# Limits from the H200 session of 2026-11-27 (a part's wall time: the Trainer at 1B 72 s, at 360M 41 s; cpt at 1B,
# micro batch 8, 100 s, most of it torch.compile of the whole model; cpt at 360M and the profiled 1B step did not
# finish in 110-120 s). Order: what no GPU session has measured yet comes first (the GPU tests, the shipped launchers
# on a GPU, the per-layer compile with its kernel table), then the comparisons with the whole-model compile.
# the GPU tests but the launchers' (about 40 s, plus the inductor compile of a tiny model for the FlashAttention
# check): a broken GPU path shows here first
part gpu_tests ${T_TESTS:-90} python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "not shipped_launcher" \
  tests/test_base_dtype.py::test_on_cuda_the_cast_frees_half_the_frozen_linears_and_training_is_bitwise_unchanged
# the shipped launchers (scripts/launch.sh ddp|fsdp with NUM_GPUS=1): NCCL, bf16, FSDP2 sharded checkpoints
part gpu_launchers ${T_LAUNCH:-150} python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py -k shipped_launcher
# llama-1b: the Trainer at its micro batch 4 (52 GB), cpt at 8 (the chunked loss frees the memory) with
# model.compile=regional (each decoder layer compiled once, the rest eager: a shorter start-up, cpt_first_step_s in
# the JSON) and a profiled step after the timed ones (--cpt-profile: its kernel table goes to $R/profile)
part llama1b_trainer ${T_LLAMA_TR:-80} $bench --shapes llama-1b --frameworks trainer --json "$R/llama1b_trainer.json"
part llama1b_mb8_regional ${T_MB8R:-150} $bench --shapes llama-1b --frameworks cpt --micro-batch 8 \
  --cpt-set model.compile=regional --json "$R/llama1b_mb8_regional.json" --cpt-profile "$R/profile"
# smollm2-360m: the Trainer at 8, cpt at 16 (hidden 960: small matmuls, larger batches amortise per-kernel overheads;
# the chunked loss keeps it at 28 GB at 8 on an H100), regional compile (the whole model's took over 110 s to compile)
part smollm2_trainer ${T_SMOL_TR:-60} $bench --shapes smollm2-360m --frameworks trainer --json "$R/smollm2_trainer.json"
part smollm2_mb16_regional ${T_SMOL16R:-150} $bench --shapes smollm2-360m --frameworks cpt --micro-batch 16 \
  --cpt-set model.compile=regional --json "$R/smollm2_mb16_regional.json"
# FP8 training (train.fp8, torchao; its wheel in .whl/): llama-1b as llama1b_mb8_regional but with the Linear layers
# in float8 (tensorwise); its tokens/s against llama1b_mb8_regional's is the speed-up (MFU stays over the bf16 peak)
part llama1b_mb8_regional_fp8 ${T_FP8:-150} $bench --shapes llama-1b --frameworks cpt --micro-batch 8 \
  --cpt-set model.compile=regional --cpt-set train.fp8=tensorwise --json "$R/llama1b_mb8_regional_fp8.json"
# then, time permitting (a second call on the warm machine): the whole-model compile at 1B and 360M (46.9% MFU at
# 1B on the H200), larger loss chunks at 1B, Liger's layer kernels at 1B (5.7% slower than without on the H200,
# 2026-11-27), the loss-only benchmark
part llama1b_mb8 ${T_MB8:-120} $bench --shapes llama-1b --frameworks cpt --micro-batch 8 --json "$R/llama1b_mb8.json"
part smollm2_mb16 ${T_SMOL16:-180} $bench --shapes smollm2-360m --frameworks cpt --micro-batch 16 \
  --json "$R/smollm2_mb16.json"
part llama1b_mb8_chunk4k ${T_MB8C:-0} $bench --shapes llama-1b --frameworks cpt --micro-batch 8 \
  --cpt-set model.compile=regional --cpt-set train.loss_chunk_tokens=4096 --json "$R/llama1b_mb8_chunk4k.json"
part smollm2_mb8 ${T_SMOL:-0} $bench --shapes smollm2-360m --frameworks cpt --json "$R/smollm2_mb8.json"
part llama1b_mb8_liger ${T_LIGER:-0} $bench --shapes llama-1b --frameworks cpt --micro-batch 8 --cpt-liger \
  --json "$R/llama1b_mb8_liger.json"
part bench_loss ${T_LOSS:-0} python3 scripts/bench_loss.py --device cuda --dtype bf16 --repeats 2
# pack: the traces come back as they are (each under the 16 MB a returned file may have), the rest as one archive
find "$R/profile" -name '*.trace.json.gz' -size -16M -exec mv {} "$OUT/" \; 2>/dev/null
tar czf "$OUT/results.tgz" -C "$R" . && rm -rf "$R"
echo "=== done in $((SECONDS - T0))s: $(ls "$OUT" | tr '\n' ' ')"
