#!/usr/bin/env bash
# DeepSpeed ZeRO training through accelerate's DeepSpeed integration.
#   scripts/launch_deepspeed.sh CONFIG.yaml [2|3] [offload] [cpt train options...]
# e.g. scripts/launch_deepspeed.sh configs/my-run.yaml 3 offload --resume
set -euo pipefail
config=${1:?usage: scripts/launch_deepspeed.sh CONFIG.yaml [2|3] [offload] [cpt train options]}; shift
stage=2  # the default also when a cpt train option stands in its place (`launch_deepspeed.sh run.yaml --resume`)
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then stage=$1; shift; fi
if [ "$stage" != 2 ] && [ "$stage" != 3 ]; then
  echo "scripts/launch_deepspeed.sh: the ZeRO stage is 2 or 3, not '$stage' (usage: CONFIG.yaml [2|3] [offload] [cpt train options])" >&2
  exit 2
fi
name=zero$stage
if [ "${1:-}" = "offload" ]; then name=${name}_offload; shift; fi
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then  # (a misspelt offload was passed on to each rank's `cpt train`)
  echo "scripts/launch_deepspeed.sh: after the ZeRO stage comes offload or a cpt train option (--...), not '$1' (usage: CONFIG.yaml [2|3] [offload] [cpt train options])" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")/.." && pwd)
ngpu=${NUM_GPUS:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
case $ngpu in ''|*[!0-9]*|0*) echo "scripts/launch_deepspeed.sh: NUM_GPUS must be a whole number >= 1, not '$ngpu'" >&2; exit 2 ;; esac  # (0: a torchrun traceback)
exec "$here/scripts/accelerate_launch.sh" --config_file "$here/configs/accelerate/$name.yaml" --num_processes "$ngpu" \
  --deepspeed_config_file "$here/configs/deepspeed/$name.json" \
  -m cpt.cli train "$config" "$@"
