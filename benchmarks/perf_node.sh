#!/usr/bin/env bash
# `make perf` on a GPU node with no network that has torch, torchvision and lightning but not the lab's other
# packages (a cluster's compute node, a lent H100). From the repo root, with the wheels of `make perf-wheels` in .whl/:
#
#     bash benchmarks/perf_node.sh DEST [key=value ...]      e.g.  bash benchmarks/perf_node.sh "$OUT" budget_s=540
#
# (docs/perf/README.md gives the lent machine's call, with commit=<the hash, computed where the checkout is>)
#
# installs the wheels into a scratch folder (nothing on the node changes) and runs `python3 -m benchmarks.perf` with
# the arguments (perf=auto: configs/perf/gpu.yaml where CUDA is available) and mirror_dir=DEST: perf.json and perf.md
# are rewritten in DEST/perf-<time>/ before and after every row (each whole, by a rename) and every row's log is
# written into DEST/perf-<time>/rows/ as the row runs, so DEST holds what was measured at any moment, even when the
# call is ended by SIGKILL. On SIGTERM or SIGINT the run's whole process group (benchmarks.perf, its row, the row's
# loader workers) gets SIGTERM: benchmarks.perf then kills the row (a Lightning process may ignore SIGTERM:
# "Bypassing SIGTERM") and writes the files with the row marked as stopped; whatever is left after a few seconds
# gets SIGKILL. If this script is killed by SIGKILL, benchmarks.perf sees its parent gone and stops too.
# docs/perf/README.md plans a lease of 15 minutes around it.
set -euo pipefail
if [ $# -lt 1 ] || [[ $1 == *=* ]]; then
  echo "usage: bash benchmarks/perf_node.sh DEST [key=value ...]   (DEST: the folder that keeps the results)" >&2
  exit 2
fi
dest=$(realpath -m "$1")  # DEST and a WHEELS folder are paths from where the script was called
shift
if [ -n "${WHEELS:-}" ]; then wheels=$(realpath -m "$WHEELS"); fi
cd "$(dirname "$0")/.."
wheels=${wheels:-$PWD/.whl}
if ! compgen -G "$wheels/*.whl" >/dev/null; then
  echo "perf_node: no wheels in $wheels/: run 'make perf-wheels' where pip reaches PyPI, and bring $wheels/ along" >&2
  exit 2
fi
GRACE_S=${PERF_NODE_GRACE_S:-5}  # after SIGTERM to the run's process group, before SIGKILL
scratch=$(mktemp -d)  # the wheels installed, the run's own folder (row configs, results, the shared cache), TMPDIR
child=
group() {  # the run's process group: its leader wrote its pid (= the group's id) before becoming benchmarks.perf
  cat "$scratch/pgid" 2>/dev/null || echo "$child"
}
stop_run() {  # SIGTERM to the whole group, a grace, then SIGKILL to what is left
  [ -n "$child" ] || return 0
  local pg
  pg=$(group)
  kill -TERM -- "-$pg" 2>/dev/null || return 0
  for _ in $(seq $((GRACE_S * 10))); do
    kill -0 -- "-$pg" 2>/dev/null || return 0
    sleep 0.1
  done
  echo "perf_node: the run's processes still there after ${GRACE_S} s: SIGKILL" >&2
  kill -KILL -- "-$pg" 2>/dev/null || true
}
finish() {
  stop_run
  rm -rf "$scratch"
  if compgen -G "$dest/perf-*" >/dev/null; then echo "perf_node: results in $(ls -d "$dest"/perf-* | tr '\n' ' ')"; fi
}
trap finish EXIT
trap 'stop_run; exit 143' TERM
trap 'stop_run; exit 130' INT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$scratch/site" "$wheels"/*.whl
mkdir "$scratch/tmp"  # the rows' temporary files (a row killed leaves its own) and torch's compile caches go too
export PYTHONPATH="$scratch/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CLIPCOMP_PERF_WATCH_PARENT=1 \
  TMPDIR="$scratch/tmp"
status=0
# in a session (and so a process group) of its own, so that a stop reaches the run, its row and the row's workers,
# and nothing else; `setsid -w` waits for it (it forks only where this shell's job is a group leader already;
# util-linux before 2.28 has no -w, and there it does not fork here)
wait_flag=-w
setsid -w true 2>/dev/null || wait_flag=
setsid $wait_flag bash -c 'echo $$ > "$0"; exec "$@"' "$scratch/pgid" \
  python3 -m benchmarks.perf out_dir="$scratch/out" mirror_dir="$dest" "$@" &
child=$!
wait "$child" || status=$?
exit "$status"
