#!/usr/bin/env bash
# Measures a snapshot catch-up with a large state, on loopback:
#   scripts/snapshot-big.sh [MB]   (default 1000: 1000 values of 1 MB)
# Starts three members, stops one, writes MB megabytes into the others, restarts
# it, and reports: the snapshot's size and transfer rate (from the leader's log),
# how long the member took to catch up, and the longest put latency on the leader
# while it built and sent the snapshot (a 1-client put loop runs throughout).
set -euo pipefail
MB=${1:-1000}
BIN=${CHORUS_BIN:-target/release/chorus}
DIR=$(mktemp -d /tmp/chorus-big.XXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$DIR"' EXIT
CLUSTER="b1=http://127.0.0.1:42380,b2=http://127.0.0.1:42480,b3=http://127.0.0.1:42580"
start() { # name client peer
  "$BIN" serve --name "$1" --data-dir "$DIR/$1" \
    --listen-client-urls "http://127.0.0.1:$2" --advertise-client-urls "http://127.0.0.1:$2" \
    --listen-peer-urls "http://127.0.0.1:$3" --initial-advertise-peer-urls "http://127.0.0.1:$3" \
    --initial-cluster "$CLUSTER" --initial-cluster-token big --snapshot-count 200 --snapshot-catchup-entries 50 \
    --max-request-bytes 2000000 >>"$DIR/$1.log" 2>&1 &
  echo $! > "$DIR/$1.pid"
}
start b1 42379 42380; start b2 42479 42480; start b3 42579 42580
sleep 3
kill -9 "$(cat "$DIR/b3.pid")"
EP=127.0.0.1:42379,127.0.0.1:42479
echo "loading ${MB} MB (1 MB values) with b3 down..."
t0=$(date +%s.%N)
"$BIN" bench put --endpoints "$EP" --clients 4 --conns 2 --val-size 1000000 --key-space "$MB" --total "$MB" \
  --duration-max 900s -w json
t1=$(date +%s.%N)
echo "load took $(echo "$t1 - $t0" | bc) s"
for m in b1 b2; do echo "$m: $(du -sh "$DIR/$m" | cut -f1) on disk, RSS $(ps -o rss= -p "$(cat "$DIR/$m.pid")") kB"; done
REV=$("$BIN" get --endpoints 127.0.0.1:42379 x -w json | python3 -c 'import json,sys; print(json.load(sys.stdin)["header"]["revision"])')
echo "revision $REV; restarting b3 with a put loop running against the others"
"$BIN" bench put --endpoints "$EP" --clients 1 --total 100000 --duration-max 60s --key-prefix probe/ -w json > "$DIR/probe.json" &
PROBE=$!
sleep 2
t0=$(date +%s.%N)
start b3 42579 42580
for _ in $(seq 1 300); do
  R=$("$BIN" get --endpoints 127.0.0.1:42579 x --consistency s -w json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["header"]["revision"])' 2>/dev/null || echo 0)
  if [ "$R" -ge "$REV" ]; then break; fi
  sleep 0.1
done
t1=$(date +%s.%N)
echo "b3 caught up to revision $R in $(echo "$t1 - $t0" | bc) s"
wait $PROBE || true
python3 -c 'import json; r=json.load(open("'"$DIR"'/probe.json")); print("put loop during catch-up: ops %d, errors %d, p50 %.2f ms, p99 %.2f ms, max %.2f ms" % (r["ops"], r["errors"], r["p50_ms"], r["p99_ms"], r["max_ms"]))'
grep -h "sent a snapshot\|received a snapshot\|snapshot not delivered" "$DIR"/b*.log | sed 's/\x1b\[[0-9;]*m//g' | tail -5
for m in b1 b2 b3; do echo "$m: RSS $(ps -o rss= -p "$(cat "$DIR/$m.pid")") kB"; done
