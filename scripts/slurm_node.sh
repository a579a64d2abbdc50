#!/usr/bin/env bash
# One node's part of scripts/slurm_multinode.sbatch, started by `srun` on every node of the job:
#   slurm_node.sh [accelerate launch options] -m cpt.cli train CONFIG ...
# Runs `accelerate launch` with this node's machine rank ($SLURM_NODEID). On SIGUSR1 (the time-limit warning, which
# srun forwards to its tasks) it signals this node's ranks, the launcher's child processes, with SIGUSR1: each finishes
# its step, all ranks agree, save a checkpoint and exit 0, and the launcher ends as after a normal run. The ranks are
# signalled directly because torchrun's agent inside `accelerate launch` does not handle SIGUSR1 (by default it would
# die of it; checked up to torch 2.13) and gives its ranks only 30 s after a SIGTERM by default.
set -u
# The launcher runs with SIGUSR1 ignored: where SLURM signals every process of the step, not only this task
# (cgroup.conf SignalChildrenProcesses=yes, proctrack/pgid or linuxproc), torchrun's agent would otherwise die of the
# warning and take the node's ranks down while they save. The ranks inherit the ignored SIGUSR1; `cpt train` replaces
# it at start-up with a handler that holds a warning until the training loop's own handler takes it.
# A preempted stop (the ranks saved and exited 0) is told from a finished run by a file the node's first rank writes
# ($CPT_PREEMPTED_MARKER): on the first node, where the batch script runs, the file it names
# ($CPT_SLURM_PREEMPTED_MARKER); on the others a node-local one (so every node's ranks exit alike).
if [ "${SLURM_NODEID:-0}" = 0 ] && [ -n "${CPT_SLURM_PREEMPTED_MARKER:-}" ]; then
  export CPT_PREEMPTED_MARKER=$CPT_SLURM_PREEMPTED_MARKER
else
  # (checked: a TMPDIR missing on this node left marker_dir empty, and every job on the node shared /preempted and
  # /stop-requested; a stale stop file stops every later start after one step)
  marker_dir=$(mktemp -d "${TMPDIR:-/tmp}/cpt-node.XXXXXX") || { echo "slurm_node.sh: cannot create a folder in ${TMPDIR:-/tmp} (TMPDIR)" >&2; exit 2; }
  trap 'rm -rf -- "$marker_dir"' EXIT
  export CPT_PREEMPTED_MARKER=$marker_dir/preempted
fi
# A rank in its first fraction of a second, before `cpt train` has replaced the ignored SIGUSR1, would lose the
# signal: the relay first creates $CPT_STOP_REQUESTED, which `cpt train` counts as a received warning when its
# training loop starts (cpt.cli.EarlyWarning).
export CPT_STOP_REQUESTED=${CPT_PREEMPTED_MARKER%/*}/stop-requested
( trap '' USR1; exec accelerate launch --machine_rank "${SLURM_NODEID:-0}" "$@" ) &
launcher=$!

signal_ranks() {  # the launcher's child processes; pkill, or /proc where procps is not installed (slim images: the
  # warning never reached the ranks, which trained on into the time limit)
  if command -v pkill >/dev/null; then pkill -USR1 -P "$launcher"; return; fi
  local kids
  kids=$(cat /proc/"$launcher"/task/*/children 2>/dev/null) || kids=''
  [ -n "${kids// /}" ] && kill -USR1 $kids 2>/dev/null  # (word splitting wanted: one pid per word)
}
relay() {  # retried until a rank got it (the warning can come while the ranks are still being started)
  echo "[slurm_node ${SLURM_NODEID:-0}] SIGUSR1: telling the ranks to checkpoint and stop"
  : > "$CPT_STOP_REQUESTED"
  until signal_ranks; do
    kill -0 "$launcher" 2>/dev/null || return
    sleep 1
  done
}
trap relay USR1

while kill -0 "$launcher" 2>/dev/null; do wait "$launcher" || true; done  # (the trap interrupts `wait`: ranks saving)
rc=0
# its status, kept by bash: a `wait` the trap interrupted returns 138 whatever the launcher did, and the relay's retries
# can outlast the launcher (reaped meanwhile): a run that finished as the warning came was reported failed, exit 138
wait "$launcher" || rc=$?
exit "$rc"
