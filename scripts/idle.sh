#!/usr/bin/env bash
# Measures what idle partitions cost: starts a 3-node cluster (scripts/cluster.sh), creates a topic
# with PARTITIONS partitions at RF 3, waits until every partition has a leader, lets it settle, and
# prints each node's CPU use (percent of one core, averaged over WINDOW seconds) and RSS.
# SLUICE_PORT_BASE moves the cluster's ports (see scripts/cluster.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${SLUICE_BIN:-target/release/sluice}
PARTITIONS=${PARTITIONS:-1000}
SETTLE=${SETTLE:-20}
WINDOW=${WINDOW:-60}
BASE=${SLUICE_PORT_BASE:-9092}
trap 'scripts/cluster.sh stop >/dev/null' EXIT
rm -rf .cluster
scripts/cluster.sh start >/dev/null
t0=$(date +%s.%N)
"$BIN" topics create --bootstrap-server "127.0.0.1:$BASE" idle \
  --partitions "$PARTITIONS" --replication-factor 3 >/dev/null
for _ in $(seq 1 "${LEADER_WAIT:-240}"); do
  n=$(curl -sf "http://127.0.0.1:$((BASE + 552))/v1/topics/idle" | python3 -c \
    'import json,sys; t=json.load(sys.stdin); print(sum(1 for p in t["partitions"] if p.get("leader") not in (None,-1)))' \
    2>/dev/null || echo 0)
  [ "$n" = "$PARTITIONS" ] && break
  sleep 1
done
took=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
echo "partitions with a leader: $n of $PARTITIONS after ${took}s (create + elections); settling ${SETTLE}s"
sleep "$SETTLE"
hz=$(getconf CLK_TCK)
declare -A before
for i in 1 2 3; do
  pid=$(cat .cluster/n$i.pid)
  before[$i]=$(awk '{print $14+$15}' /proc/$pid/stat)
done
sleep "$WINDOW"
for i in 1 2 3; do
  pid=$(cat .cluster/n$i.pid)
  after=$(awk '{print $14+$15}' /proc/$pid/stat)
  rss=$(awk '/VmRSS/ {printf "%d", $2/1024}' /proc/$pid/status)
  awk -v d=$((after - before[$i])) -v hz="$hz" -v w="$WINDOW" -v n="$i" -v rss="$rss" \
    'BEGIN { printf "node %s: %.1f%% of a core, RSS %s MiB\n", n, 100*d/hz/w, rss }'
done
