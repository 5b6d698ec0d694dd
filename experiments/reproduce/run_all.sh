#!/usr/bin/env bash
# The five reproduce studies in two lanes, one study at a time in each: a single sweep keeps about one of
# the two cores busy (XLA compiles on one thread), so two lanes halve the wall time on a 2-core machine.
# A rerun resumes every study (finished runs are skipped). Logs and per-study times go to OUT.
#
#   experiments/reproduce/run_all.sh [OUT]        # OUT defaults to runs/studies
set -u
OUT=${1:-runs/studies}
BIN=${BIN:-.venv/bin}
mkdir -p "$OUT"

lane() {
    for study in "$@"; do
        local start=$SECONDS
        echo "$(date -u +%FT%TZ) start $study (log: $OUT/$study.log)"
        "$BIN/moe-lora" sweep --study "experiments/reproduce/$study.yaml" --out "$OUT/$study" > "$OUT/$study.log" 2>&1
        local rc=$?
        echo "$(date -u +%FT%TZ) end $study: exit $rc after $(( (SECONDS - start) / 60 )) min" | tee -a "$OUT/times.txt"
    done
}

start=$SECONDS
# Balanced by measured CPU time (docs/reproduce.md): about 75 min of one core in each lane.
lane c_methods a_mola_shapes &
lane b_alphalora d_milora_ablations e_balance_losses &
wait
echo "all five studies: $(( (SECONDS - start) / 60 )) min; per study: $OUT/times.txt, tables: $OUT/*/results.md"
