#!/usr/bin/env bash
# Counts false suspicions of the failure detector under write load with no faults:
# starts `chorus dev` (release build), runs `chorus bench put --clients 16` for
# DURATION (default 10m, bounded), then prints every member's diagnosis changes
# from /metrics and the "peer diagnosis changed" log lines. Stops everything it started.
#
#   cargo build --release -p chorus && scripts/health-soak.sh 10m
set -euo pipefail
DURATION=${1:-10m}
BIN=${CHORUS_BIN:-${CARGO_TARGET_DIR:-target}/release/chorus}
WORK=$(mktemp -d)
"$BIN" dev --data-dir "$WORK/data" --base-port 2379 >"$WORK/dev.out" 2>"$WORK/dev.err" &
DEV=$!
trap 'kill $DEV 2>/dev/null; wait $DEV 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 1 100); do grep -q ready "$WORK/dev.out" && break; sleep 0.2; done
grep -q ready "$WORK/dev.out" || { echo "chorus dev did not start"; cat "$WORK/dev.err"; exit 1; }
"$BIN" bench put --clients 16 --conns 4 --total 1000000000 --duration-max "$DURATION" | tail -n 12
echo "--- diagnosis changes (chorus_peer_diagnosis_changes_total), per member"
for port in 2381 22381 32381; do
  echo "member with metrics on :$port"
  curl -s "127.0.0.1:$port/metrics" | grep '^chorus_peer_diagnosis_changes_total' || echo "  none"
  curl -s "127.0.0.1:$port/metrics" | grep -E '^chorus_raft_leader_changes_total|^chorus_peer_phi'
done
echo "--- log lines: $(grep -c 'peer diagnosis changed' "$WORK/dev.err" || true) diagnosis changes," \
  "$(grep -c 'clock skew alarm' "$WORK/dev.err" || true) clock alarms"
grep 'peer diagnosis changed' "$WORK/dev.err" | head -n 40 || true
