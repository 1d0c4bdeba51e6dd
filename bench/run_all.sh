#!/bin/sh
# Run every benchmark and the fault tests, then write bench/RESULTS.md from their output.
#
#   bench/run_all.sh          short settings (about 5 minutes)
#   bench/run_all.sh --full   the scripts' full-size defaults (about 12 minutes: 1,000,000
#                             backlog rows, 100,000 hostile frames, 20 kills)
#
# Outputs go to bench/out/<short|full>/; bench/RESULTS.md shows every mode found there.
# Nothing else should run on the machine meanwhile: the figures are ratios measured in one
# run, on whatever CPU time the machine gives.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PYTEST=${PYTEST:-.venv/bin/pytest}
MODE=short
if [ "${1:-}" = "--full" ]; then MODE=full; fi
OUT=bench/out/$MODE
rm -rf "$OUT"
mkdir -p "$OUT"
# the code measured: HEAD, and whether fs_cc360/ had uncommitted changes
{
    git rev-parse --short HEAD 2>/dev/null || echo unknown
    if [ -n "$(git status --porcelain -- fs_cc360 2>/dev/null)" ]; then echo "+ uncommitted changes in fs_cc360/"; fi
} | tr '\n' ' ' > "$OUT/commit"

# run TAG SCRIPT [ARGS...]: output in $OUT/TAG.txt, the command line in $OUT/TAG.cmd
run() {
    tag=$1
    script=$2
    shift 2
    echo "== python bench/$script.py $*"
    echo "python bench/$script.py $*" > "$OUT/$tag.cmd"
    status=0
    "$PY" "bench/$script.py" "$@" > "$OUT/$tag.txt" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        echo "   (exit status $status)" | tee -a "$OUT/$tag.txt"
    fi
    grep -E '^(RESULT|RATIO)' "$OUT/$tag.txt" | sed 's/^/   /' || true
}

if [ "$MODE" = full ]; then
    run parse bench_parse
    run enqueue bench_enqueue
    run delivery bench_delivery
    run latency-200 bench_latency --rate 200
    run latency-100 bench_latency --rate 100
    run latency-50 bench_latency --rate 50
    run backlog bench_backlog
    run crash bench_crash
    run hostile bench_hostile
    run console bench_console
    run catchup bench_catchup
    run pg bench_pg
else
    run parse bench_parse --calls 1500 --repeat 3
    run enqueue bench_enqueue --events 50000 --repeat 2
    run delivery bench_delivery --seconds 3
    run latency-200 bench_latency --rate 200 --seconds 10
    run latency-50 bench_latency --rate 50 --seconds 10
    run backlog bench_backlog --rows 100000 --drain-seconds 60
    run crash bench_crash --kills 10
    run hostile bench_hostile --frames 20000
    run console bench_console --rows 200000 --repeat 5
    run catchup bench_catchup --short
    run pg bench_pg --rows 10000 --deliver 1000
fi

echo "== pytest -m fault tests/test_faults.py"
echo "pytest -s -rxX tests/test_faults.py" > "$OUT/faults.cmd"
"$PYTEST" -q -s -rxX -p no:cacheprovider tests/test_faults.py > "$OUT/faults.txt" 2>&1 || true
grep -E '^FAULT|passed|failed' "$OUT/faults.txt" | cut -c1-160 | sed 's/^/   /' || true

"$PY" bench/report.py > bench/RESULTS.md
echo "== wrote bench/RESULTS.md"
