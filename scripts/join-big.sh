#!/usr/bin/env bash
# Measures a member joining a cluster that holds a large state, on loopback:
#   scripts/join-big.sh [MB]   (default 1000: 1000 values of 1 MB)
# Starts three members, writes MB megabytes, adds a fourth as a learner with
# etcdctl, starts it with --initial-cluster-state existing, and reports how long
# it took to be caught up (by a snapshot) and promoted by the leader, with the
# longest put latency of a 1-client put loop that runs meanwhile.
set -euo pipefail
MB=${1:-1000}
BIN=${CHORUS_BIN:-target/release/chorus}
DIR=$(mktemp -d /tmp/chorus-join.XXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$DIR"' EXIT
CLUSTER="j1=http://127.0.0.1:43380,j2=http://127.0.0.1:43480,j3=http://127.0.0.1:43580"
start() { # name client peer initial-cluster [state]
  "$BIN" serve --name "$1" --data-dir "$DIR/$1" \
    --listen-client-urls "http://127.0.0.1:$2" --advertise-client-urls "http://127.0.0.1:$2" \
    --listen-peer-urls "http://127.0.0.1:$3" --initial-advertise-peer-urls "http://127.0.0.1:$3" \
    --initial-cluster "$4" --initial-cluster-state "${5:-new}" --initial-cluster-token join \
    --max-request-bytes 2000000 >>"$DIR/$1.log" 2>&1 &
}
start j1 43379 43380 "$CLUSTER"; start j2 43479 43480 "$CLUSTER"; start j3 43579 43580 "$CLUSTER"
sleep 3
EP=127.0.0.1:43379,127.0.0.1:43479,127.0.0.1:43579
echo "loading ${MB} MB (1 MB values)..."
"$BIN" bench put --endpoints "$EP" --clients 4 --conns 2 --val-size 1000000 --key-space "$MB" --total "$MB" \
  --duration-max 900s -w json
ETCDCTL_API=3 etcdctl --endpoints "$EP" member add j4 --peer-urls http://127.0.0.1:43680 --learner >/dev/null
"$BIN" bench put --endpoints "$EP" --clients 1 --total 1000000 --duration-max 45s --key-prefix probe/ -w json > "$DIR/probe.json" &
PROBE=$!
sleep 1
t0=$(date +%s.%N)
start j4 43679 43680 "$CLUSTER,j4=http://127.0.0.1:43680" existing
promoted=""
for _ in $(seq 1 1200); do
  if ETCDCTL_API=3 etcdctl --endpoints "$EP" member list -w json 2>/dev/null \
      | python3 -c 'import json,sys; m=[x for x in json.load(sys.stdin)["members"] if x.get("name")=="j4"]; sys.exit(0 if m and not m[0].get("isLearner") else 1)'; then
    promoted=yes; break
  fi
  sleep 0.1
done
t1=$(date +%s.%N)
if [ -n "$promoted" ]; then echo "j4 joined and was promoted $(echo "$t1 - $t0" | bc) s after it started"; else echo "j4 was NOT promoted"; fi
wait $PROBE 2>/dev/null || true
python3 -c 'import json; r=json.load(open("'"$DIR"'/probe.json")); print("put loop meanwhile: ops %d, errors %d, p50 %.2f ms, p99 %.2f ms, max %.2f ms" % (r["ops"], r["errors"], r["p50_ms"], r["p99_ms"], r["max_ms"]))' 2>/dev/null || echo "(put loop report unavailable)"
grep -h "sent a snapshot\|received a snapshot\|promoting a learner\|built a snapshot" "$DIR"/j*.log | sed 's/\x1b\[[0-9;]*m//g' | tail -6
