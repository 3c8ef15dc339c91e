#!/usr/bin/env bash
# Two chorus builds side by side: for each of N pairs, starts a fresh three-member
# cluster of build A on loopback, runs one `chorus bench` workload against it (the
# leader's endpoint first, as bench/compare does), stops it, then the same with build
# B (the order flips every pair, so that drift on a shared machine hits both), and
# prints every run and the medians. With one client the run talks to the leader.
#   scripts/ab.sh A_BIN B_BIN PAIRS [chorus bench arguments]
#   e.g. scripts/ab.sh /tmp/chorus-before target/release/chorus 5 put --clients 64 --conns 8 --total 80000
# Extra `chorus serve` flags for both builds: AB_SERVE_ARGS="--threads 1".
# Per run it also prints each member's mean storage write per cycle
# (chorus_disk_wal_fsync_duration_seconds from /metrics). A shared 2-core machine
# moves by 20-40% within the hour: trust medians of several pairs, not one run.
set -uo pipefail
A=${1:?usage: scripts/ab.sh A_BIN B_BIN PAIRS [bench arguments]}
B=${2:?usage: scripts/ab.sh A_BIN B_BIN PAIRS [bench arguments]}
PAIRS=${3:?usage: scripts/ab.sh A_BIN B_BIN PAIRS [bench arguments]}
shift 3
[ $# -gt 0 ] || set -- put --clients 64 --conns 8 --total 80000
[ "$PAIRS" -ge 1 ] && [ "$PAIRS" -le 50 ] || { echo "PAIRS must be 1..50" >&2; exit 2; }
for bin in "$A" "$B"; do [ -x "$bin" ] || { echo "$bin is not an executable" >&2; exit 2; }; done
WORK=$(mktemp -d /tmp/chorus-ab.XXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT
INITIAL="m1=http://127.0.0.1:45481,m2=http://127.0.0.1:45482,m3=http://127.0.0.1:45483"
EP=127.0.0.1:45471,127.0.0.1:45472,127.0.0.1:45473

# run LABEL BIN: one cluster, one bench run; appends "LABEL ops/s p50 p99" to $WORK/results
run() {
  local label=$1 bin=$2 dir pids=() i
  shift 2
  dir=$(mktemp -d "$WORK/run.XXXX")
  for i in 1 2 3; do
    # shellcheck disable=SC2086
    CHORUS_LOG=warn "$bin" serve --name "m$i" --data-dir "$dir/m$i" \
      --listen-client-urls "http://127.0.0.1:4547$i" --advertise-client-urls "http://127.0.0.1:4547$i" \
      --listen-peer-urls "http://127.0.0.1:4548$i" --initial-advertise-peer-urls "http://127.0.0.1:4548$i" \
      --initial-cluster "$INITIAL" --initial-cluster-token ab --initial-cluster-state new \
      ${AB_SERVE_ARGS:-} >"$dir/m$i.log" 2>&1 &
    pids+=($!)
  done
  local ready=""
  for _ in $(seq 100); do
    "$bin" --endpoints "$EP" put ab/ready 1 >/dev/null 2>&1 && { ready=1; break; }
    sleep 0.2
  done
  [ -n "$ready" ] || { echo "$label: the cluster did not start; logs in $dir" >&2; cp -r "$dir" /tmp/; exit 1; }
  local eps
  eps=$("$bin" --endpoints "$EP" -w json status | python3 -c '
import json, sys
rows = json.load(sys.stdin)
lead = [r["Endpoint"] for r in rows if r["Status"]["leader"] == r["Status"]["header"]["member_id"]]
print(",".join(lead + [r["Endpoint"] for r in rows if r["Endpoint"] not in lead]))')
  "$bin" --endpoints "$eps" -w json bench "$@" --key-size 32 --val-size 256 >"$dir/bench.json" 2>"$dir/bench.err" \
    || { echo "$label: bench failed: $(tail -1 "$dir/bench.err")" >&2; exit 1; }
  local writes=""
  for i in 1 2 3; do
    writes+=$(curl -s "http://127.0.0.1:4547$i/metrics" | awk '
      /^chorus_disk_wal_fsync_duration_seconds_sum/ { s = $2 }
      /^chorus_disk_wal_fsync_duration_seconds_count/ { c = $2 }
      END { if (c > 0) printf " %.0f", s / c * 1e6; else printf " -" }')
  done
  kill "${pids[@]}" 2>/dev/null
  wait "${pids[@]}" 2>/dev/null
  python3 - "$dir/bench.json" "$label" "$writes" >>"$WORK/results" <<'EOF'
import json, sys
# The watch workload prints two reports (from put sent, from put acknowledged): the first counts.
r = json.JSONDecoder().raw_decode(open(sys.argv[1]).read().lstrip())[0]
print("%s %.0f %.3f %.3f%s" % (sys.argv[2], r["ops_per_s"], r["p50_ms"], r["p99_ms"], sys.argv[3]))
EOF
  tail -1 "$WORK/results" | awk '{ printf "%-2s %8s ops/s  p50 %s ms  p99 %s ms  storage write per cycle (us):%s %s %s\n", $1, $2, $3, $4, $5, $6, $7 }'
  rm -rf "$dir"
}

for pair in $(seq "$PAIRS"); do
  if [ $((pair % 2)) -eq 1 ]; then run A "$A" "$@"; run B "$B" "$@"; else run B "$B" "$@"; run A "$A" "$@"; fi
done
python3 - "$WORK/results" <<'EOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
med = {}
for label in ("A", "B"):
    runs = [r for r in rows if r[0] == label]
    med[label] = [statistics.median(float(r[i]) for r in runs) for i in (1, 2, 3)]
    print("%s median of %d: %.0f ops/s  p50 %.3f ms  p99 %.3f ms" % (label, len(runs), *med[label]))
a, b = med["A"], med["B"]
print("B/A: ops/s %.3f  p50 %.3f  p99 %.3f" % (b[0] / a[0], b[1] / a[1], b[2] / a[2]))
EOF
