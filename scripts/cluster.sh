#!/usr/bin/env bash
# Starts (or stops) a 3-node Sluice cluster on loopback: `scripts/cluster.sh start|stop|status`.
# Data, logs and PIDs live in .cluster/ at the repo root. Only processes started here are stopped.
# SLUICE_PORT_BASE (default 9092) moves every port, so two clusters on one machine do not collide:
# node i (1..3) listens on 127.0.0.1 at kafka BASE + 10000*(i-1), Raft one above it and admin HTTP
# 552 above it (9092, 9093, 9644 for node 1 by default).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${SLUICE_BIN:-target/release/sluice}
DIR=.cluster
BASE=${SLUICE_PORT_BASE:-9092}
kafka_port() { echo $((BASE + ($1 - 1) * 10000)); }
raft_port() { echo $((BASE + 1 + ($1 - 1) * 10000)); }
admin_port() { echo $((BASE + 552 + ($1 - 1) * 10000)); }
PEERS="1@127.0.0.1:$(raft_port 1),2@127.0.0.1:$(raft_port 2),3@127.0.0.1:$(raft_port 3)"

start() {
  [ -x "$BIN" ] || { echo "missing $BIN: run cargo build --release first" >&2; exit 1; }
  mkdir -p "$DIR"
  for i in 1 2 3; do
    pidf="$DIR/n$i.pid"
    if [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
      echo "node $i already running (pid $(cat "$pidf"))"; continue
    fi
    "$BIN" server --node-id "$i" --data-dir "$DIR/n$i" \
      --kafka-addr "127.0.0.1:$(kafka_port "$i")" --raft-addr "127.0.0.1:$(raft_port "$i")" \
      --admin-addr "127.0.0.1:$(admin_port "$i")" --peers "$PEERS" >"$DIR/n$i.log" 2>&1 &
    echo $! >"$pidf"
    echo "node $i: pid $!, kafka 127.0.0.1:$(kafka_port "$i"), admin 127.0.0.1:$(admin_port "$i"), log $DIR/n$i.log"
  done
  for _ in $(seq 1 60); do
    if curl -sf "http://127.0.0.1:$(admin_port 1)/v1/health" >/dev/null 2>&1 \
      && curl -sf "http://127.0.0.1:$(admin_port 2)/v1/health" >/dev/null 2>&1 \
      && curl -sf "http://127.0.0.1:$(admin_port 3)/v1/health" >/dev/null 2>&1; then
      echo "cluster ready; bootstrap servers: 127.0.0.1:$(kafka_port 1),127.0.0.1:$(kafka_port 2),127.0.0.1:$(kafka_port 3)"
      return 0
    fi
    sleep 0.5
  done
  echo "cluster did not become healthy within 30 s; see $DIR/n*.log" >&2
  exit 1
}

stop() {
  for i in 1 2 3; do
    pidf="$DIR/n$i.pid"
    [ -f "$pidf" ] || continue
    pid=$(cat "$pidf")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
      echo "node $i stopped"
    fi
    rm -f "$pidf"
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) "$BIN" cluster status --admin-addr "127.0.0.1:$(admin_port 1)" ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
