#!/usr/bin/env bash
# `make perf` on a GPU node with no network that has torch, torchvision and lightning but not the lab's other
# packages (a cluster's compute node, a lent H100). From the repo root, with the wheels of `make perf-wheels` in .whl/:
#
#     bash benchmarks/perf_node.sh DEST [key=value ...]        e.g.  bash benchmarks/perf_node.sh /tmp/kept compile=[false]
#
# installs the wheels into a scratch folder (nothing on the node changes), runs `python3 -m benchmarks.perf` with the
# arguments (perf=auto: configs/perf/gpu.yaml where CUDA is available), and copies the run's perf.json, perf.md and
# every row's log (rows.tar.gz) into DEST/perf-<time>/. docs/perf/README.md plans a short lease around it.
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
site=$(mktemp -d)
out=$(mktemp -d)
keep() {  # perf.json and perf.md are rewritten after every row: what was measured is kept, even when stopped
  for run in "$out"/perf-*/; do  # one run folder, unless the arguments were refused before it was made
    [ -d "$run" ] || continue
    kept="$dest/$(basename "$run")"
    mkdir -p "$kept"
    cp "$run"perf.json "$run"perf.md "$kept"/ 2>/dev/null || true
    if [ -d "$run"rows ]; then tar czf "$kept/rows.tar.gz" -C "$run" rows || true; fi
    echo "perf_node: kept $(ls "$kept" | tr '\n' ' ')in $kept"
  done
}
trap 'keep; rm -rf "$site" "$out"' EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
# in a process group of its own, so that a stop (a lease's time limit: SIGTERM) ends the run and its row's process,
# and the script, not waiting for them, keeps what was measured
setsid python3 -m benchmarks.perf out_dir="$out" "$@" &
child=$!
trap 'kill -TERM -- "-$child" 2>/dev/null; wait "$child"; exit 143' TERM INT
wait "$child" || status=$?
exit "$status"
