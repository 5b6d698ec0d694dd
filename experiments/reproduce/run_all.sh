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

lane() {  # runs its studies in turn; exits 1 when any of them failed
    local failed=0
    for study in "$@"; do
        local start=$SECONDS
        echo "$(date -u +%FT%TZ) start $study (log: $OUT/$study.log)"
        "$BIN/moe-lora" sweep --study "experiments/reproduce/$study.yaml" --out "$OUT/$study" > "$OUT/$study.log" 2>&1
        local rc=$?
        [ $rc -eq 0 ] || failed=1
        echo "$(date -u +%FT%TZ) end $study: exit $rc after $(( (SECONDS - start) / 60 )) min" | tee -a "$OUT/times.txt"
    done
    return $failed
}

start=$SECONDS
# Balanced by the studies' CPU time: on 2 idle cores the lanes took 70 and 77 min (2026-12-02).
lane c_methods a_mola_shapes & first=$!
lane b_alphalora d_milora_ablations e_balance_losses & second=$!
status=0
wait $first || status=1
wait $second || status=1
echo "all five studies: $(( (SECONDS - start) / 60 )) min; per study: $OUT/times.txt, tables: $OUT/*/results.md"
[ $status -eq 0 ] || echo "a study had failed runs: see its log; rerun to retry them (finished runs are skipped)"
exit $status
