#!/usr/bin/env bash
# Measures a defragmentation of a large database under load, on loopback:
#   scripts/defrag-big.sh [MB]   (default 1000: 1000 values of 1 MB)
# Starts three members, writes MB megabytes, overwrites all of it once and
# compacts (so half the file is free), then defragments the leader with
# `etcdctl defrag` while a 1-client put loop and a 1-client get loop run against
# it, and reports the file size before and after, how long the defragmentation
# took, how long the member's driver was held for the swap (from its log), and
# the slowest put and get of 1-client loops that run PROBE_S seconds around it,
# next to the same loops on the same cluster without a defragmentation.
set -euo pipefail
MB=${1:-1000}
BIN=${CHORUS_BIN:-target/release/chorus}
PROBE_S=${PROBE_S:-12} # how long the put and get loops run, once without and once around the defragmentation (which starts 1 s in)
DIR=$(mktemp -d /tmp/chorus-defrag.XXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$DIR"' EXIT
CLUSTER="d1=http://127.0.0.1:43380,d2=http://127.0.0.1:43480,d3=http://127.0.0.1:43580"
start() { # name client peer
  "$BIN" serve --name "$1" --data-dir "$DIR/$1" \
    --listen-client-urls "http://127.0.0.1:$2" --advertise-client-urls "http://127.0.0.1:$2" \
    --listen-peer-urls "http://127.0.0.1:$3" --initial-advertise-peer-urls "http://127.0.0.1:$3" \
    --initial-cluster "$CLUSTER" --initial-cluster-token defrag --snapshot-count 200 --snapshot-catchup-entries 50 \
    --max-request-bytes 2000000 >>"$DIR/$1.log" 2>&1 &
  echo $! > "$DIR/$1.pid"
}
start d1 43379 43380; start d2 43479 43480; start d3 43579 43580
sleep 3
EP=127.0.0.1:43379,127.0.0.1:43479,127.0.0.1:43579
echo "writing ${MB} MB twice (1 MB values)..."
"$BIN" bench put --endpoints "$EP" --clients 4 --conns 2 --val-size 1000000 --key-space "$MB" --total "$((MB * 2))" \
  --duration-max 1200s -w json
REV=$("$BIN" get --endpoints "$EP" x -w json | python3 -c 'import json,sys; print(json.load(sys.stdin)["header"]["revision"])')
"$BIN" compact --endpoints "$EP" "$REV" >/dev/null
sleep 2
LEADER_EP=$(etcdctl --endpoints "$EP" endpoint status -w json | python3 -c '
import json,sys
s=json.load(sys.stdin)
print([e["Endpoint"] for e in s if e["Status"]["leader"]==e["Status"]["header"]["member_id"]][0])')
status() { etcdctl --endpoints "$LEADER_EP" endpoint status -w json | python3 -c '
import json,sys; s=json.load(sys.stdin)[0]["Status"]; print("dbSize %.1f MB, dbSizeInUse %.1f MB" % (s["dbSize"]/1e6, s["dbSizeInUse"]/1e6))'; }
echo "leader $LEADER_EP before: $(status)"
probe() { # tag: a put loop and a get loop against the leader for PROBE_S seconds
  "$BIN" bench put --endpoints "$LEADER_EP" --clients 1 --total 10000000 --duration-max "${PROBE_S}s" --key-prefix "probe-$1/" -w json > "$DIR/put-$1.json" &
  PROBES="$!"
  "$BIN" bench get --endpoints "$LEADER_EP" --clients 1 --total 100000000 --duration-max "${PROBE_S}s" -w json > "$DIR/get-$1.json" 2>/dev/null &
  PROBES="$PROBES $!"
}
echo "baseline: ${PROBE_S} s of the loops without a defragmentation"
probe quiet
wait $PROBES
echo "now the same with a defragmentation starting 1 s in"
probe defrag
sleep 1
t0=$(date +%s.%N)
etcdctl --endpoints "$LEADER_EP" --command-timeout 600s defrag
t1=$(date +%s.%N)
wait $PROBES
echo "defragmentation took $(echo "$t1 - $t0" | bc) s"
echo "leader after: $(status)"
grep -h "defragmented the database" "$DIR"/d*.log | sed 's/\x1b\[[0-9;]*m//g' | tail -3
for tag in quiet defrag; do for f in put get; do
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("%s: %s loop: ops %d, errors %d, p50 %.2f ms, p99 %.2f ms, max %.2f ms" % (sys.argv[3], sys.argv[2], r["ops"], r["errors"], r["p50_ms"], r["p99_ms"], r["max_ms"]))' "$DIR/$f-$tag.json" "$f" "$tag" 2>/dev/null || echo "$tag $f loop: no summary"
done; done
