#!/usr/bin/env bash
# `accelerate launch ARGS...` for scripts/launch.sh and scripts/launch_deepspeed.sh (which exec this).
# Without `--preempted-exit-code N` among the `cpt train` options in ARGS: exec'd as it is.
# With it, the launch exits N when its ranks stopped on SIGTERM/SIGUSR1 with their checkpoint saved, or on a SIGTERM
# sent to this script while they were starting (nothing to save) (a k8s Job with `restartPolicy: OnFailure` or a
# podFailurePolicy then starts it again; add --resume), 0 when the run finished (also if the launcher, signalled
# during the final export, exits 1) and the launcher's status after an error. The ranks still exit 0 on a preempted stop (a rank's non-zero exit makes
# torchrun print a ChildFailedError traceback and exit 1): the node's first rank writes the file $CPT_PREEMPTED_MARKER
# names, a fresh one per launch, and this script turns the launcher's status into N (torchrun's 1 too: a SIGTERM to the
# whole process group signals it as well, and it then exits 1 although its ranks saved). It then runs the launcher in the
# background and passes a SIGTERM or SIGUSR1 sent to it to the ranks, the launcher's children (a pod's SIGTERM reaches
# only the container's first process; torchrun's agent would die of a SIGUSR1 and gives its ranks 30 s after a SIGTERM).
set -euo pipefail
code='' prev=''
for arg in "$@"; do
  if [ "$prev" = --preempted-exit-code ]; then code=$arg; fi
  case $arg in --preempted-exit-code=*) code=${arg#*=} ;; esac
  prev=$arg
done
[ -n "$code" ] || exec accelerate launch "$@"

marker_dir=$(mktemp -d "${TMPDIR:-/tmp}/cpt-launch.XXXXXX")
trap 'rm -rf -- "$marker_dir"' EXIT
export CPT_PREEMPTED_MARKER=$marker_dir/preempted
( trap '' USR1; exec accelerate launch "$@" ) &
launcher=$!

signal_ranks() {  # the launcher's child processes; pkill, or /proc where procps is not installed (slim images)
  if command -v pkill >/dev/null; then pkill "-$1" -P "$launcher"; return; fi
  local kids
  kids=$(cat /proc/"$launcher"/task/*/children 2>/dev/null) || kids=''
  [ -n "${kids// /}" ] && kill "-$1" $kids 2>/dev/null  # (word splitting wanted: one pid per word)
}
relay() {  # retried until a rank got it (the signal can come while the ranks are still being started)
  until signal_ranks "$1"; do
    kill -0 "$launcher" 2>/dev/null || return 0
    sleep 1
  done
}
got=''  # the signal this script received, if any
trap 'got=TERM; relay TERM' TERM
trap 'got=USR1; relay USR1' USR1

while kill -0 "$launcher" 2>/dev/null; do wait "$launcher" || true; done  # (a trap interrupts `wait`)
rc=0
wait "$launcher" || rc=$?  # (its status, kept by bash)
# the node's first rank's line: preempted (every rank's checkpoint saved), start-up (stopped by SIGTERM while starting:
# nothing trained, nothing to save) or finished (the run ended)
stopped=$(head -n 1 "$CPT_PREEMPTED_MARKER" 2>/dev/null || true)
# a SIGTERM to the whole process group reaches torchrun too: it exits 1 with a SignalException traceback of its own
# although its ranks saved (or finished) and exited 0
case $stopped in
  finished)
    [ "$rc" = 0 ] || echo "${0##*/}: the launcher exited $rc after its ranks finished the run (it was signalled too): exit 0" >&2
    exit 0 ;;
  start-up)
    # (without a signal here, the ranks' SIGTERM came from the launcher ending them after another rank failed)
    if [ -n "$got" ]; then
      echo "${0##*/}: the run was stopped while starting (nothing to save; --resume continues from its newest checkpoint): exit $code (--preempted-exit-code)" >&2
      exit "$code"
    fi ;;
  '')
    # (no line: the ranks did not answer this script's signal; under a second since they started, before `cpt` could
    # install its handlers, the signal's default action ends them: nothing trained yet)
    if [ -n "$got" ] && [ "$rc" != 0 ]; then
      echo "${0##*/}: the ranks ended on the $got passed to them before they could answer it (still starting: nothing to save): exit $code (--preempted-exit-code)" >&2
      exit "$code"
    fi ;;
  preempted)
    [ "$rc" = 0 ] || echo "${0##*/}: the launcher exited $rc after its ranks' preempted stop (torchrun was signalled too)" >&2
    echo "${0##*/}: the run was preempted (its checkpoint is saved): exit $code (--preempted-exit-code)" >&2
    exit "$code" ;;
esac
exit "$rc"
