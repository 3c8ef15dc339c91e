#!/usr/bin/env bash
# Where the CPU goes in a one-machine comparison: starts a three-member cluster of
# chorus or etcd on loopback, runs one `chorus bench` workload against it, and
# prints the CPU seconds each member and the load generator used during the run
# (from /proc/PID/stat), with the run's throughput.
#   scripts/cpu-split.sh chorus|etcd [chorus bench arguments]
#   e.g. scripts/cpu-split.sh etcd get --clients 64 --conns 8 --consistency s --total 100000
# Divide each figure by the run's operations for the CPU cost of one request.
set -uo pipefail
SYSTEM=${1:?usage: scripts/cpu-split.sh chorus|etcd [bench arguments]}
shift
[ $# -gt 0 ] || set -- get --clients 64 --conns 8 --consistency s --total 100000 --duration-max 8s
BIN=${CHORUS_BIN:-target/release/chorus}
DIR=$(mktemp -d /tmp/chorus-cpu.XXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"' EXIT
INITIAL="m1=http://127.0.0.1:45381,m2=http://127.0.0.1:45382,m3=http://127.0.0.1:45383"
pids=()
for i in 1 2 3; do
  client="http://127.0.0.1:4537$i"
  peer="http://127.0.0.1:4538$i"
  common=(--name "m$i" --data-dir "$DIR/m$i" --listen-client-urls "$client" --advertise-client-urls "$client"
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" --initial-cluster "$INITIAL"
    --initial-cluster-token cpu-split --initial-cluster-state new)
  case "$SYSTEM" in
    chorus) CHORUS_LOG=warn "$BIN" serve "${common[@]}" >"$DIR/m$i.log" 2>&1 & ;;
    etcd) etcd "${common[@]}" --logger zap --log-level warn >"$DIR/m$i.log" 2>&1 & ;;
    *) echo "system must be chorus or etcd" >&2; exit 2 ;;
  esac
  pids+=($!)
done
EP=127.0.0.1:45371,127.0.0.1:45372,127.0.0.1:45373
for _ in $(seq 50); do "$BIN" --endpoints "$EP" put cpu-split/ready 1 >/dev/null 2>&1 && break; sleep 0.2; done
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
before=()
for pid in "${pids[@]}"; do before+=("$(cpu_ticks "$pid")"); done
/usr/bin/time -f "load generator: %U s user + %S s system" \
  "$BIN" --endpoints "$EP" -w json bench "$@" --key-size 32 --val-size 256 >"$DIR/bench.json" 2>"$DIR/bench.err"
tail -1 "$DIR/bench.err"
hz=$(getconf CLK_TCK)
for i in 0 1 2; do
  after=$(cpu_ticks "${pids[$i]}")
  echo "member $((i + 1)): $(echo "scale=2; ($after - ${before[$i]}) / $hz" | bc) s"
done
python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("run: %d ops, %.0f ops/s, p50 %.2f ms, p99 %.2f ms" % (r["ops"], r["ops_per_s"], r["p50_ms"], r["p99_ms"]))' "$DIR/bench.json"
