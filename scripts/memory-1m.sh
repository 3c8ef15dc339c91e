#!/usr/bin/env bash
# Resident memory of each member after 1,000,000 keys of 256 bytes, chorus next to etcd:
#   scripts/memory-1m.sh [KEYS]   (default 1000000; SYSTEMS=chorus for one of them;
#   RESTART=1 also restarts chorus's third member and prints its RSS once it has read the data back)
# Starts a three-member chorus cluster, writes KEYS distinct 32-byte keys with 256-byte
# values (chorus bench, 64 clients), waits 5 s, prints each member's VmRSS and data
# directory size, stops it; then the same for a three-member etcd cluster (Debian's
# etcd-server, default settings). Both use the same load generator and fsync durability.
set -euo pipefail
KEYS=${1:-1000000}
BIN=${CHORUS_BIN:-target/release/chorus}
ETCD=${ETCD_BIN:-etcd}
DIR=$(mktemp -d /tmp/chorus-mem.XXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$DIR"' EXIT
run() { # system
  local system=$1 cluster="" eps="" i
  for i in 1 2 3; do
    cluster+="${cluster:+,}m$i=http://127.0.0.1:4${i}680"
    eps+="${eps:+,}127.0.0.1:4${i}679"
  done
  for i in 1 2 3; do
    local args=(--name "m$i" --data-dir "$DIR/$system/m$i"
      --listen-client-urls "http://127.0.0.1:4${i}679" --advertise-client-urls "http://127.0.0.1:4${i}679"
      --listen-peer-urls "http://127.0.0.1:4${i}680" --initial-advertise-peer-urls "http://127.0.0.1:4${i}680"
      --initial-cluster "$cluster" --initial-cluster-token "mem-$system" --initial-cluster-state new)
    if [ "$system" = chorus ]; then
      CHORUS_LOG=warn "$BIN" serve "${args[@]}" >"$DIR/$system-m$i.log" 2>&1 &
    else
      env -u ETCDCTL_API "$ETCD" "${args[@]}" --log-level warn --logger zap >"$DIR/$system-m$i.log" 2>&1 &
    fi
    echo $! >"$DIR/$system-m$i.pid"
  done
  sleep 4
  local t0 t1
  t0=$(date +%s)
  "$BIN" bench put --endpoints "$eps" --clients 64 --conns 8 --total "$KEYS" --key-space "$KEYS" \
    --sequential-keys --key-size 32 --val-size 256 --duration-max 1800s | tail -1
  t1=$(date +%s)
  sleep 5
  echo "$system: $KEYS keys written in $((t1 - t0)) s"
  for i in 1 2 3; do
    local pid rss
    pid=$(cat "$DIR/$system-m$i.pid")
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    echo "$system m$i: RSS $((rss / 1024)) MiB, data directory $(du -sm "$DIR/$system/m$i" | cut -f1) MiB"
  done
  if [ "$system" = chorus ] && [ -n "${RESTART:-}" ]; then
    # The same member after a restart: the key space read back from disk, without
    # whatever the write path left allocated.
    kill "$(cat "$DIR/$system-m3.pid")"; sleep 2
    CHORUS_LOG=warn "$BIN" serve --name m3 --data-dir "$DIR/$system/m3" \
      --listen-client-urls http://127.0.0.1:43679 --advertise-client-urls http://127.0.0.1:43679 \
      --listen-peer-urls http://127.0.0.1:43680 --initial-advertise-peer-urls http://127.0.0.1:43680 \
      --initial-cluster "$cluster" --initial-cluster-token "mem-$system" >>"$DIR/$system-m3.log" 2>&1 &
    echo $! >"$DIR/$system-m3.pid"
    sleep 15
    echo "$system m3 after a restart: RSS $(( $(awk '/VmRSS/ {print $2}' "/proc/$(cat "$DIR/$system-m3.pid")/status") / 1024 )) MiB"
  fi
  for i in 1 2 3; do kill "$(cat "$DIR/$system-m$i.pid")"; done
  wait 2>/dev/null || true
}
for system in ${SYSTEMS:-chorus etcd}; do run "$system"; done
