#!/usr/bin/env bash
# Single-node multi-GPU training with accelerate.
#   scripts/launch.sh CONFIG.yaml [ddp|fsdp|zero2|zero3|zero2_offload|zero3_offload] [cpt train options...]
# NUM_GPUS defaults to every visible GPU.
set -euo pipefail
config=${1:?usage: scripts/launch.sh CONFIG.yaml [strategy] [cpt train options]}; shift
here=$(cd "$(dirname "$0")/.." && pwd)
strategy=ddp  # the default also when a cpt train option stands in its place (`launch.sh run.yaml --resume`)
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then strategy=$1; shift; fi
if [ ! -f "$here/configs/accelerate/$strategy.yaml" ]; then  # (accelerate's answer: a traceback)
  echo "scripts/launch.sh: unknown strategy '$strategy' (one of: $(cd "$here/configs/accelerate" && ls -- *.yaml | sed 's/\.yaml$//' | paste -sd' ' -))" >&2
  exit 2
fi
ngpu=${NUM_GPUS:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
case $ngpu in ''|*[!0-9]*|0*) echo "scripts/launch.sh: NUM_GPUS must be a whole number >= 1, not '$ngpu'" >&2; exit 2 ;; esac  # (0: a torchrun traceback)
ds=()  # the ZeRO configs name their DeepSpeed JSON relative to the repo root: pass it absolute
[ -f "$here/configs/deepspeed/$strategy.json" ] && ds=(--deepspeed_config_file "$here/configs/deepspeed/$strategy.json")
exec "$here/scripts/accelerate_launch.sh" --config_file "$here/configs/accelerate/$strategy.yaml" --num_processes "$ngpu" "${ds[@]}" \
  -m cpt.cli train "$config" "$@"
