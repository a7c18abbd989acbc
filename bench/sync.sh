#!/usr/bin/env bash
# quotad batch-sync throughput (not a test): `bash bench/sync.sh`. See bench/README.md.
#
# Starts a private redis-server, the Firestore emulator and target/release/quotad in
# redis-primary, makes N providers dirty through the API (one POST /quota/s<i>/consume for
# each i in 0..N-1, driven by wrk), stops the server, times `quotad sync --once` and reports
# providers/s = written / elapsed. Then, in the same emulator, times raw :commit requests of
# 500 writes for N documents of another collection (bench/fs_raw_commit.py) and prints both
# rates and their ratio. Writes the report to bench/results-sync-latest.txt.
# Everything it started is stopped on exit (the emulator's whole process group too).
#
# Environment:
#   SYNC_N                number of dirty providers and of raw documents (default 100000)
#   SYNC_PRODUCE_TIMEOUT  seconds allowed for making them dirty (default 900)
#   SYNC_TIMEOUT          seconds allowed for `quotad sync --once` (default 1800)
#   BENCH_KEEP            1: keep the work dir (logs, raw outputs) even on success
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
cd "$ROOT"

N=${SYNC_N:-100000}
PRODUCE_TIMEOUT=${SYNC_PRODUCE_TIMEOUT:-900}
SYNC_TIMEOUT=${SYNC_TIMEOUT:-1800}
THREADS=2
CONNS=64
PROJECT=bench
ADMIN_TOKEN=bench
RESULTS="$BENCH_DIR/results-sync-latest.txt"
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "SYNC_N must be a positive integer" >&2; exit 2; }

WORK=$(mktemp -d /tmp/quotad-sync.XXXXXX)
PIDS=()  # processes to stop
PGIDS=() # process groups to stop (the emulator: gcloud -> java)
STATUS=1

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'sync bench: %s\n' "$*" >&2; exit 1; }

stop_pid() {
  local pid=$1 i
  kill "$pid" 2>/dev/null || return 0
  for i in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local kept=() p
  for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || kept+=("$p"); done
  PIDS=("${kept[@]+"${kept[@]}"}")
}

stop_group() {
  local pgid=$1 i
  kill -TERM -- "-$pgid" 2>/dev/null || return 0
  for i in $(seq 1 100); do
    kill -0 -- "-$pgid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL -- "-$pgid" 2>/dev/null || true
  wait "$pgid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local p
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do stop_pid "$p"; done
  for p in "${PGIDS[@]+"${PGIDS[@]}"}"; do stop_group "$p"; done
  if [[ $STATUS -eq 0 && ${BENCH_KEEP:-0} != 1 ]]; then
    rm -rf "$WORK"
  else
    echo "sync bench: logs and raw outputs kept in $WORK" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "sync bench: interrupted" >&2; exit 130' INT TERM

free_port() {
  local p _
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  die "no free port found"
}

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

# ---------------------------------------------------------------- tools and build
need=()
for tool in wrk redis-server redis-cli curl python3 gcloud java jq; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if ((${#need[@]})); then
  log "installing wrk redis-server curl jq (missing: ${need[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y wrk redis-server curl jq >/dev/null 2>&1 ||
    { apt-get update >/dev/null && apt-get install -y wrk redis-server curl jq >/dev/null; }
  for tool in "${need[@]}"; do
    command -v "$tool" >/dev/null || die "$tool missing (gcloud with the Firestore emulator and java are not installed by this script)"
  done
fi

log "cargo build --release --bin quotad"
cargo build --release --bin quotad
QUOTAD_BIN="$ROOT/target/release/quotad"
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then
  COMMIT="$COMMIT (+ uncommitted changes in src/Cargo)"
fi
LOAD_START=$(uptime)

# ---------------------------------------------------------------- redis
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --daemonize no --logfile "$WORK/redis.log" --dir "$WORK" &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for _ in $(seq 1 100); do
  [[ $(redis-cli -p "$REDIS_PORT" PING 2>/dev/null) == PONG ]] && break
  kill -0 "$REDIS_PID" 2>/dev/null || die "redis-server did not start (see $WORK/redis.log)"
  sleep 0.1
done
rcli() { redis-cli -p "$REDIS_PORT" "$@"; }
echo "redis-server pid $REDIS_PID on 127.0.0.1:$REDIS_PORT (no persistence)" >&2

# ---------------------------------------------------------------- firestore emulator
FS_PORT=$(free_port)
FS_HOST="127.0.0.1:$FS_PORT"
log "gcloud emulators firestore start --host-port=$FS_HOST"
# setsid: its own process group, so the JVM grandchild is stopped with it.
setsid gcloud emulators firestore start --host-port="$FS_HOST" >"$WORK/emulator.log" 2>&1 &
FS_PGID=$!
PGIDS+=("$FS_PGID")
T0=$(now)
for _ in $(seq 1 600); do
  [[ $(curl -s "http://$FS_HOST/" 2>/dev/null) == Ok* ]] && break
  kill -0 "$FS_PGID" 2>/dev/null || { cat "$WORK/emulator.log" >&2; die "the emulator exited"; }
  sleep 0.2
done
[[ $(curl -s "http://$FS_HOST/" 2>/dev/null) == Ok* ]] || { cat "$WORK/emulator.log" >&2; die "the emulator did not answer Ok"; }
echo "emulator ready on $FS_HOST after $(since "$T0") s" >&2

# ---------------------------------------------------------------- quotad
QUOTAD_PORT=$(free_port)
Q="http://127.0.0.1:$QUOTAD_PORT"
# env -i: nothing else leaks in from the caller. The yearly schedule keeps the server's own
# scheduled sync (default 03:00 UTC daily) out of the measurement.
QENV=(env -i PATH="$PATH" HOME="${HOME:-/root}"
  REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
  FIRESTORE_PROJECT_ID="$PROJECT"
  FIRESTORE_EMULATOR_HOST="$FS_HOST"
  QUOTAD_PHASE=redis-primary
  QUOTAD_ADMIN_TOKEN="$ADMIN_TOKEN"
  QUOTAD_SYNC_SCHEDULE="0 0 1 1 *"
  RUST_LOG=warn)
"${QENV[@]}" QUOTAD_ADDR="127.0.0.1:$QUOTAD_PORT" "$QUOTAD_BIN" >"$WORK/quotad.log" 2>&1 &
QUOTAD_PID=$!
PIDS+=("$QUOTAD_PID")
for _ in $(seq 1 300); do
  curl -fsS -o /dev/null "$Q/readyz" 2>/dev/null && break
  kill -0 "$QUOTAD_PID" 2>/dev/null || { cat "$WORK/quotad.log" >&2; die "quotad exited"; }
  sleep 0.1
done
READYZ=$(curl -sS "$Q/readyz")
PHASE=$(curl -fsS -H "Authorization: Bearer $ADMIN_TOKEN" "$Q/admin/phase")
echo "quotad pid $QUOTAD_PID on $Q: readyz $READYZ, phase $PHASE" >&2
[[ $READYZ == *'"firestore":"ok"'* && $READYZ == *'"redis":"ok"'* ]] || die "quotad not ready: $READYZ"
[[ $PHASE == *redis-primary* ]] || die "quotad not in redis-primary: $PHASE"

# ---------------------------------------------------------------- N dirty providers
log "making $N providers dirty: wrk -t$THREADS -c$CONNS, POST /quota/s<0..$((N - 1))>/consume once each"
PRODUCE_T0=$(now)
wrk -t"$THREADS" -c"$CONNS" -d"${PRODUCE_TIMEOUT}s" --timeout 30s -s "$BENCH_DIR/sync_walk.lua" \
  "$Q/quota/s0/consume" -- "$N" "$THREADS" >"$WORK/wrk-walk.txt" 2>&1 &
WRK_PID=$!
PIDS+=("$WRK_PID")
DIRTY=0 LAST=-1 STALL=0
while kill -0 "$WRK_PID" 2>/dev/null; do
  DIRTY=$(rcli ZCARD quotad:dirty)
  ((DIRTY >= N)) && break
  # every consume answered but fewer dirty records (a lost request): stop waiting after 10 s
  if ((DIRTY == LAST)); then STALL=$((STALL + 1)); else STALL=0; fi
  LAST=$DIRTY
  ((STALL >= 50)) && { echo "dirty count stuck at $DIRTY for 10 s: stopping wrk" >&2; break; }
  sleep 0.2
done
PRODUCE_S=$(since "$PRODUCE_T0")
kill -INT "$WRK_PID" 2>/dev/null || true
wait "$WRK_PID" || true
PIDS=("${PIDS[@]/$WRK_PID/}")
cat "$WORK/wrk-walk.txt" >&2
DIRTY=$(rcli ZCARD quotad:dirty)
WALK=$(grep '^walk:' "$WORK/wrk-walk.txt" || echo "walk: (no summary)")
PRODUCE_RATE=$(awk -v n="$DIRTY" -v t="$PRODUCE_S" 'BEGIN { printf "%.0f", n / t }')
echo "dirty providers in Redis: $DIRTY of $N after $PRODUCE_S s ($PRODUCE_RATE /s); $WALK" >&2
PROBLEMS=()
((DIRTY == N)) || PROBLEMS+=("only $DIRTY of $N providers dirty after the walk ($WALK)")
[[ $WALK == *"not 200 0"* ]] || PROBLEMS+=("walk: some consumes not answered 200 ($WALK)")
echo "a sample: GET /quota/s0 -> $(curl -fsS "$Q/quota/s0")" >&2
stop_pid "$QUOTAD_PID"
grep -iE 'warn|error' "$WORK/quotad.log" | grep -v 'QUOTAD_API_KEYS\|caller endpoints are open' | head -5 >&2 || true

# ---------------------------------------------------------------- quotad sync --once
log "timing quotad sync --once ($DIRTY dirty providers)"
SYNC_T0=$(now)
SYNC_RC=0
timeout "$SYNC_TIMEOUT" "${QENV[@]}" "$QUOTAD_BIN" sync --once >"$WORK/sync.json" 2>"$WORK/sync.log" || SYNC_RC=$?
SYNC_S=$(since "$SYNC_T0")
echo "sync --once exit $SYNC_RC after $SYNC_S s: $(cat "$WORK/sync.json")" >&2
tail -5 "$WORK/sync.log" >&2
REPORT=$(jq -c . "$WORK/sync.json" 2>/dev/null | tail -1) || true
[[ -n $REPORT ]] || die "sync --once printed no JSON report (exit $SYNC_RC; see $WORK/sync.log)"
WRITTEN=$(jq -r .written <<<"$REPORT")
FAILED=$(jq -r .failed <<<"$REPORT")
PROVIDERS=$(jq -r .providers <<<"$REPORT")
INNER_S=$(python3 -c 'import json, sys
from datetime import datetime
r = json.loads(sys.argv[1])
def t(v): return datetime.fromisoformat(v[:26].rstrip("Z") + "+00:00")
print("%.3f" % (t(r["finishedAt"]) - t(r["startedAt"])).total_seconds())' "$REPORT" 2>/dev/null || echo "?")
SYNC_RATE=$(awk -v n="$WRITTEN" -v t="$SYNC_S" 'BEGIN { printf "%.1f", n / t }')
((SYNC_RC == 0)) || PROBLEMS+=("quotad sync --once exited $SYNC_RC")
((FAILED == 0)) || PROBLEMS+=("sync report: failed $FAILED")
((WRITTEN == DIRTY)) || PROBLEMS+=("sync report: written $WRITTEN of $DIRTY dirty")
LEFT=$(rcli ZCARD quotad:dirty)
((LEFT == 0)) || PROBLEMS+=("$LEFT providers still dirty after the sync")
DOCS=$(python3 "$BENCH_DIR/fs_raw_commit.py" count "$FS_HOST" "$PROJECT" providers 2>&1) || DOCS="? ($DOCS)"
echo "provider documents in the emulator after the sync: $DOCS; still dirty: $LEFT" >&2
[[ $DOCS == "$WRITTEN" ]] || PROBLEMS+=("documents in providers: $DOCS, written: $WRITTEN")

# ---------------------------------------------------------------- raw emulator batch writes
log "raw :commit of $N documents (rawbench/d<i>), 500 writes per request, one connection"
RAW=$(python3 "$BENCH_DIR/fs_raw_commit.py" write "$FS_HOST" "$PROJECT" rawbench "$N" 500) ||
  die "raw commit failed: $RAW"
echo "$RAW" >&2
RAW_S=$(jq -r .seconds <<<"$RAW")
RAW_RATE=$(jq -r .docs_per_s <<<"$RAW")
RAW_DOCS=$(python3 "$BENCH_DIR/fs_raw_commit.py" count "$FS_HOST" "$PROJECT" rawbench 2>&1) || RAW_DOCS="?"
[[ $RAW_DOCS == "$N" ]] || PROBLEMS+=("documents in rawbench: $RAW_DOCS, expected $N")
LOAD_END=$(uptime)

report() {
  echo "quotad sync benchmark  $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit $COMMIT"
  echo "machine: nproc $(nproc); load average at start: ${LOAD_START#*load average: }; at end: ${LOAD_END#*load average: }"
  echo "redis-server (no persistence) + gcloud Firestore emulator on $FS_HOST + target/release/quotad, all on 127.0.0.1"
  echo "dirty providers: $DIRTY of N=$N, made by POST /quota/s<i>/consume once each (wrk -t$THREADS -c$CONNS,"
  echo "  redis-primary: each a cache miss read from the emulator) in $PRODUCE_S s = $PRODUCE_RATE providers/s; $WALK"
  echo "sync report: $REPORT"
  echo
  printf '%-52s %9s %10s %12s\n' "run" "docs" "seconds" "docs/s"
  printf '%-52s %9s %10s %12s\n' "quotad sync --once (wall, process start to exit)" "$WRITTEN" "$SYNC_S" "$SYNC_RATE"
  printf '%-52s %9s %10s %12s\n' "  (the report's startedAt..finishedAt)" "$WRITTEN" "$INNER_S" \
    "$(awk -v n="$WRITTEN" -v t="$INNER_S" 'BEGIN { if (t + 0 > 0) printf "%.1f", n / t; else print "-" }')"
  printf '%-52s %9s %10s %12s\n' "raw :commit, 500 writes each, sequential" "$N" "$RAW_S" "$RAW_RATE"
  echo
  awk -v a="$SYNC_RATE" -v b="$RAW_RATE" 'BEGIN { printf "quotad sync / raw batch writes: %.3f (raw is %.1f x faster)\n", a / b, b / a }'
  if ((${#PROBLEMS[@]})); then
    echo
    echo "PROBLEMS:"
    printf '  %s\n' "${PROBLEMS[@]}"
  fi
}
report | tee "$RESULTS"
echo "written to ${RESULTS#"$ROOT"/}" >&2
STATUS=0
