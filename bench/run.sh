#!/usr/bin/env bash
# quotad benchmark harness (not a test): `bash bench/run.sh [all|quota|ratelimit]`.
# See bench/README.md. No argument (or `all`) runs everything; `quota` only the quota lines,
# `ratelimit` only the rate-limit lines (plus the echo ceiling, which every ratio divides by).
#
# Builds the release binaries, starts a private redis-server, quotad (embedded in-memory
# ledger, no Firestore) and the bare axum echo server on free loopback ports, runs wrk and
# redis-benchmark against them, prints a table and writes it to bench/results-latest.txt.
# Everything it started is stopped on exit, including on Ctrl-C.
#
# Environment:
#   BENCH_DURATION  wrk (and oha) duration per run        (default 20s)
#   BENCH_REDIS_N   redis-benchmark request count          (default 2000000)
#   BENCH_OHA_RATE  oha fixed offered rate, req/s          (default 10000)
#   BENCH_KEEP      1: keep the work dir (logs, raw outputs) even on success
#   BENCH_WORKERS   tokio worker threads of quotad and of the echo ceiling alike
#                   (TOKIO_WORKER_THREADS; default 1: wrk, Redis and the server share 2 cores)
# The rate-limit part (bash bench/run.sh ratelimit) also prints memory per key at the starter
# plan's policy; the batch sync has its own script, bench/sync.sh.
set -euo pipefail

MODE=${1:-all}
case $MODE in
  all | quota | ratelimit) ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
  *) echo "usage: bash bench/run.sh [all|quota|ratelimit]" >&2; exit 2 ;;
esac
want() { [[ $MODE == all || $MODE == "$1" ]]; }

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
cd "$ROOT"

DURATION=${BENCH_DURATION:-20s}
THREADS=2
CONNS=64
REDIS_N=${BENCH_REDIS_N:-2000000}
OHA_RATE=${BENCH_OHA_RATE:-10000}
WORKERS=${BENCH_WORKERS:-1}
ADMIN_TOKEN=bench
HUGE=1000000000000 # 10^12, the largest limit API.md allows
RESULTS="$BENCH_DIR/results-latest.txt"

WORK=$(mktemp -d /tmp/quotad-bench.XXXXXX)
PIDS=()
STATUS=1

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }

stop_pid() {
  local pid=$1 i
  kill "$pid" 2>/dev/null || return 0
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local kept=() p
  for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || kept+=("$p"); done
  PIDS=("${kept[@]+"${kept[@]}"}")
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local p
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do stop_pid "$p"; done
  if [[ $STATUS -eq 0 && ${BENCH_KEEP:-0} != 1 ]]; then
    rm -rf "$WORK"
  else
    echo "bench: logs and raw outputs kept in $WORK" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "bench: interrupted" >&2; exit 130' INT TERM

# A loopback port nothing listens on (checked by connecting; the race is harmless here).
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

# run_bg OUTFILE CMD...: runs CMD in the background and waits for it, so that Ctrl-C runs the
# trap at once (bash defers traps until a foreground child ends, and wrk catches SIGINT
# and exits 0, which would let the script go on). CMD ignores SIGINT; cleanup stops it.
run_bg() {
  local out=$1 pid rc=0
  shift
  "$@" >"$out" &
  pid=$!
  PIDS+=("$pid")
  wait "$pid" || rc=$?
  local kept=() p
  for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || kept+=("$p"); done
  PIDS=("${kept[@]+"${kept[@]}"}")
  return "$rc"
}

wait_http() {
  local url=$1 pid=$2 _
  for _ in $(seq 1 150); do
    curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------- 1. tools
need=()
for tool in wrk redis-server redis-benchmark redis-cli curl; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if ((${#need[@]})); then
  log "installing wrk redis-server curl (missing: ${need[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y wrk redis-server curl >/dev/null 2>&1 ||
    { apt-get update >/dev/null && apt-get install -y wrk redis-server curl >/dev/null; }
  for tool in "${need[@]}"; do command -v "$tool" >/dev/null || die "$tool still missing"; done
fi

# ---------------------------------------------------------------- 2. build
log "cargo build --release --bin quotad --example echo"
cargo build --release --bin quotad --example echo
QUOTAD_BIN="$ROOT/target/release/quotad"
ECHO_BIN="$ROOT/target/release/examples/echo"

COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then
  COMMIT="$COMMIT (+ uncommitted changes in src/Cargo)"
fi
# Share of CPU time the machine spent busy over one second, all cores (100 % = both cores).
cpu_busy() {
  local a b
  a=$(head -1 /proc/stat); sleep 1; b=$(head -1 /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN {
    n = split(a, x, " "); split(b, y, " "); t = 0
    for (i = 2; i <= n; i++) t += y[i] - x[i]
    idle = (y[5] - x[5]) + (y[6] - x[6])
    printf "%.0f%%", t ? 100 * (t - idle) / t : 0 }'
}
LOAD_START=$(uptime)
BUSY_START=$(cpu_busy)
TOP_START=$(ps -eo pcpu=,comm= --sort=-pcpu | head -5 | awk '{printf "%s %s%%; ", $2, $1}')
NPROC=$(nproc)

# ---------------------------------------------------------------- results
NAMES=() RPS=() P50=() P99=() NON2XX=() SOCKERR=() NOTES=()
ECHO_RPS=""

# "250.00us" | "1.20ms" | "1.05s" | "2.00m" -> milliseconds
to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
    printf "%.3f", n }'
}

# CPU time (user + system) of a process so far, in clock ticks.
cpu_ticks() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  stat=${stat##*) }
  awk '{print $12 + $13}' <<<"$stat"
}
CLK_TCK=$(getconf CLK_TCK)

# run_wrk NAME URL [LUA] [NOTE] [LUA ARGS...]; SERVER_PID: the HTTP server under test (its CPU % is reported,
# and Redis's, 100 % = one core)
# Busy ticks of the whole machine (all cores) and CPU ticks of this shell's reaped children
# (wrk, once run_bg has waited for it): "other" CPU during a run = machine - server - redis -
# wrk, i.e. anything else on the machine (a build, a test suite) that distorts the figures.
machine_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }
children_ticks() { # must not run in a subshell (a subshell's children are not ours): sets CHILD_TICKS
  times >"$WORK/times.txt" # a builtin with a redirection runs in this shell
  CHILD_TICKS=$(awk -v h="$CLK_TCK" 'NR == 2 {
    n = 0
    for (i = 1; i <= 2; i++) { v = $i; split(v, p, "m"); sub(/s$/, "", p[2]); n += (p[1] * 60 + p[2]) * h }
    printf "%.0f", n }' "$WORK/times.txt")
}
SERVER_PID="" SRVCPU=() RCPU=() OCPU=()
run_wrk() {
  local name=$1 url=$2 script=${3:-} note=${4:-}
  shift $(($# < 4 ? $# : 4))
  local script_args=("$@")
  local out="$WORK/wrk-${#NAMES[@]}.txt"
  local args=(-t"$THREADS" -c"$CONNS" -d"$DURATION" --latency)
  [[ -n $script ]] && args+=(-s "$script")
  ((${#script_args[@]})) && log "$name: wrk ${args[*]} $url -- ${script_args[*]}" || log "$name: wrk ${args[*]} $url"
  local s0 r0 t0 s1 r1 t1
  local m0 c0 m1 c1
  children_ticks
  m0=$(machine_ticks) c0=$CHILD_TICKS
  s0=$(cpu_ticks "$SERVER_PID") r0=$(cpu_ticks "$REDIS_PID") t0=$(date +%s.%N)
  if ((${#script_args[@]})); then
    run_bg "$out" wrk "${args[@]}" "$url" -- "${script_args[@]}"
  else
    run_bg "$out" wrk "${args[@]}" "$url"
  fi
  s1=$(cpu_ticks "$SERVER_PID") r1=$(cpu_ticks "$REDIS_PID") t1=$(date +%s.%N)
  children_ticks
  m1=$(machine_ticks) c1=$CHILD_TICKS
  OCPU+=("$(awk -v m="$((m1 - m0))" -v s="$((s1 - s0))" -v r="$((r1 - r0))" -v c="$((c1 - c0))" -v t="$t1" -v u="$t0" -v h="$CLK_TCK" \
    'BEGIN { o = m - s - r - c; if (o < 0) o = 0; printf "%.0f", 100 * o / h / (t - u) }')")
  SRVCPU+=("$(awk -v a="$s0" -v b="$s1" -v t="$t1" -v u="$t0" -v h="$CLK_TCK" 'BEGIN { printf "%.0f", 100 * (b - a) / h / (t - u) }')")
  RCPU+=("$(awk -v a="$r0" -v b="$r1" -v t="$t1" -v u="$t0" -v h="$CLK_TCK" 'BEGIN { printf "%.0f", 100 * (b - a) / h / (t - u) }')")
  cat "$out" >&2
  local rps p50 p99 non2xx sockerr
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
  p50=$(awk '/Latency Distribution/ {d=1} d && $1=="50%" {print $2; exit}' "$out")
  p99=$(awk '/Latency Distribution/ {d=1} d && $1=="99%" {print $2; exit}' "$out")
  non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$out")
  sockerr=$(awk '/Socket errors:/ {gsub(/,/, ""); print $4+$6+$8+$10}' "$out")
  [[ -n $rps && -n $p50 && -n $p99 ]] || die "could not parse wrk output of $name ($out)"
  NAMES+=("$name") RPS+=("$rps") P50+=("$(to_ms "$p50")") P99+=("$(to_ms "$p99")")
  NON2XX+=("${non2xx:-0}") SOCKERR+=("${sockerr:-0}") NOTES+=("$note")
  sleep 1
}

# run_oha NAME URL: fixed offered rate, coordinated omission corrected
OHA_LINES=()
run_oha() {
  local name=$1 url=$2 out="$WORK/oha-${#OHA_LINES[@]}.json"
  log "$name: oha -z $DURATION -q $OHA_RATE -c $CONNS --latency-correction (POST {\"amount\":1})"
  run_bg "$out" oha -z "$DURATION" -q "$OHA_RATE" -c "$CONNS" --latency-correction --no-tui --output-format json \
    -m POST -H 'Content-Type: application/json' -d '{"amount":1}' "$url"
  local line
  line=$(jq -r '[.summary.requestsPerSec, .latencyPercentiles.p50 * 1000, .latencyPercentiles.p99 * 1000,
      ([.statusCodeDistribution | to_entries[] | select(.key | test("^2") | not) | .value] | add // 0)]
      | @tsv' "$out") || die "could not parse oha output of $name ($out)"
  OHA_LINES+=("$name	$line")
  sleep 1
}

admin() { # admin METHOD PATH [BODY]
  curl -fsS -X "$1" -H "Authorization: Bearer $ADMIN_TOKEN" -H 'Content-Type: application/json' \
    ${3:+-d "$3"} "http://127.0.0.1:$QUOTAD_PORT$2"
}

QUOTAD_PID="" QUOTAD_PORT=""
start_quotad() { # start_quotad PHASE
  local phase=$1
  QUOTAD_PORT=$(free_port)
  # env -i: no FIRESTORE_* (nor any other QUOTAD_*) leaks in from the caller's environment.
  env -i PATH="$PATH" HOME="${HOME:-/root}" \
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" \
    QUOTAD_ADDR="127.0.0.1:$QUOTAD_PORT" \
    QUOTAD_PHASE="$phase" \
    QUOTAD_ADMIN_TOKEN="$ADMIN_TOKEN" \
    QUOTAD_DEFAULT_LIMIT="$HUGE" \
    RUST_LOG=warn \
    TOKIO_WORKER_THREADS="$WORKERS" \
    "$QUOTAD_BIN" >"$WORK/quotad-$phase.log" 2>&1 &
  QUOTAD_PID=$!
  SERVER_PID=$QUOTAD_PID
  PIDS+=("$QUOTAD_PID")
  wait_http "http://127.0.0.1:$QUOTAD_PORT/healthz" "$QUOTAD_PID" ||
    { cat "$WORK/quotad-$phase.log" >&2; die "quotad ($phase) did not start"; }
  echo "quotad pid $QUOTAD_PID on 127.0.0.1:$QUOTAD_PORT: readyz $(curl -sS "http://127.0.0.1:$QUOTAD_PORT/readyz")," \
    "phase $(admin GET /admin/phase)" >&2
}

# ---------------------------------------------------------------- 3. redis
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
echo "redis-server $(redis-server --version | awk '{print $3}') pid $REDIS_PID on 127.0.0.1:$REDIS_PORT (no persistence)" >&2

# ---------------------------------------------------------------- 4. echo ceiling
ECHO_PORT=$(free_port)
TOKIO_WORKER_THREADS="$WORKERS" "$ECHO_BIN" "127.0.0.1:$ECHO_PORT" >"$WORK/echo.log" 2>&1 &
ECHO_PID=$!
PIDS+=("$ECHO_PID")
wait_http "http://127.0.0.1:$ECHO_PORT/echo" "$ECHO_PID" || die "echo did not start"
SERVER_PID=$ECHO_PID
[[ $(curl -fsS -H 'Content-Type: application/json' -d '{"amount":1}' "http://127.0.0.1:$ECHO_PORT/echo") == '{"amount":1}' ]] ||
  die "echo does not echo"

# The ceiling is measured again between the quota and the rate-limit lines and after
# them (the echo server idles meanwhile): on a shared machine one run can land in a fast or
# a slow spell, so every ratio divides by the mean of the echo runs, each shown in the table.
ECHO_RUNS=()
run_echo() { # run_echo NAME
  SERVER_PID=$ECHO_PID
  ECHO_RUNS+=("${#NAMES[@]}")
  run_wrk "$1" "http://127.0.0.1:$ECHO_PORT/echo" "$BENCH_DIR/post_json.lua"
}
run_echo "echo POST /echo (ceiling)"
HAVE_OHA=0
if want quota && command -v oha >/dev/null 2>&1 && command -v jq >/dev/null 2>&1; then
  HAVE_OHA=1
  run_oha "echo POST /echo" "http://127.0.0.1:$ECHO_PORT/echo"
fi

# redis_bench NAME NOTE OUTBASE ARGS...: redis-benchmark -c 50 -n REDIS_N -q ARGS..., one line
# of the "redis ceiling" part of the table (ops/s and p50).
REDIS_LINES=()
redis_bench() {
  local name=$1 note=$2 base=$3
  shift 3
  local shown=() a
  for a in "$@"; do [[ -n $a ]] && shown+=("$a") || shown+=("''"); done
  echo "redis-benchmark -p $REDIS_PORT -c 50 -n $REDIS_N -q ${shown[*]}" >&2
  local m0 c0 r0 t0 other
  children_ticks
  m0=$(machine_ticks) c0=$CHILD_TICKS r0=$(cpu_ticks "$REDIS_PID") t0=$(date +%s.%N)
  run_bg "$WORK/$base.raw" redis-benchmark -p "$REDIS_PORT" -c 50 -n "$REDIS_N" -q "$@"
  children_ticks
  other=$(awk -v m="$(($(machine_ticks) - m0))" -v r="$(($(cpu_ticks "$REDIS_PID") - r0))" -v c="$((CHILD_TICKS - c0))" \
    -v t="$(date +%s.%N)" -v u="$t0" -v h="$CLK_TCK" 'BEGIN { o = m - r - c; if (o < 0) o = 0; printf "%.0f", 100 * o / h / (t - u) }')
  tr '\r' '\n' <"$WORK/$base.raw" >"$WORK/$base.txt"
  local last ops p50
  last=$(grep 'requests per second' "$WORK/$base.txt" | tail -1)
  echo "  ${last##*: }" >&2
  ops=$(sed -E 's/.*: ([0-9.]+) requests per second.*/\1/' <<<"$last")
  p50=$(sed -nE 's/.*p50=([0-9.]+) msec.*/\1/p' <<<"$last")
  [[ -n $ops ]] || die "could not parse redis-benchmark output ($WORK/$base.txt)"
  REDIS_LINES+=("$name	$note	$ops	${p50:--}	$other")
}

PROBLEMS=()
if want quota; then
# ---------------------------------------------------------------- 5. quotad, redis-primary
start_quotad redis-primary
Q="http://127.0.0.1:$QUOTAD_PORT"
echo "PUT /admin/quota/hot -> $(admin PUT /admin/quota/hot "{\"limit\": $HUGE, \"used\": 0}")" >&2
echo "warm GET /quota/hot -> $(curl -fsS "$Q/quota/hot")" >&2
echo "check POST /quota/hot/consume -> $(curl -fsS -H 'Content-Type: application/json' -d '{"amount":1}' "$Q/quota/hot/consume")" >&2

run_wrk "GET /quota/hot (cached)" "$Q/quota/hot" "" "redis-primary"
run_wrk "POST /quota/hot/consume" "$Q/quota/hot/consume" "$BENCH_DIR/post_json.lua" "redis-primary"
HOT_AFTER=$(curl -fsS "$Q/quota/hot")
run_wrk "POST /quota/p<0..9999>/consume" "$Q/quota/p0/consume" "$BENCH_DIR/consume_many.lua" "redis-primary, 10k providers"
if ((HAVE_OHA)); then
  run_oha "POST /quota/hot/consume (redis-primary)" "$Q/quota/hot/consume"
fi
MANY_KEYS=$(rcli --scan --pattern 'quotad:q:{p*}' | wc -l)
DECISIONS=$(curl -fsS "$Q/metrics" | grep -i 'decision' | grep -v '^#' | head -8 || true)
stop_pid "$QUOTAD_PID"
echo "after the hot consume run: $HOT_AFTER; cached records of p<N> providers: $MANY_KEYS" >&2
echo "decision metrics (redis-primary):" >&2
echo "$DECISIONS" >&2

# ---------------------------------------------------------------- 6. quotad, dual-write
rcli FLUSHALL >/dev/null
start_quotad dual-write
Q="http://127.0.0.1:$QUOTAD_PORT"
echo "PUT /admin/quota/hot -> $(admin PUT /admin/quota/hot "{\"limit\": $HUGE, \"used\": 0}")" >&2
curl -fsS -o /dev/null "$Q/quota/hot"
run_wrk "POST /quota/hot/consume" "$Q/quota/hot/consume" "$BENCH_DIR/post_json.lua" "dual-write (in-memory ledger)"
sleep 1
admin POST /admin/quota/hot/invalidate >/dev/null
DUAL_AFTER=$(curl -fsS "$Q/quota/hot")
echo "dual-write: after invalidate, GET /quota/hot (from the ledger) -> $DUAL_AFTER" >&2
stop_pid "$QUOTAD_PID"

# ---------------------------------------------------------------- 7. redis ceiling
log "redis-benchmark EVALSHA of src/storage/redis/scripts/apply.lua"
rcli FLUSHALL >/dev/null
SHA=$(rcli SCRIPT LOAD "$(cat src/storage/redis/scripts/apply.lua)")
RK='bench:q:{hot}' DK='bench:dirty'
# One change per call (quotad sends the changes that are ready together in one call; under
# load a call carries several): dirty index, the sender's receipts, then the record (a
# change without an idempotency key sends no other key); deadline 0 (none), TTL, the
# receipt's slot and the call's number (1 and 1: quotad's calls take the slots in turn), then
# per item: n (1 here), op, amount, keyed, provider, key id.
# The record as load.lua writes it.
rcli HSET "$RK" used 0 limit "$HUGE" epoch 0 base 0 from 0 ver 0 synced 0 >/dev/null
CHECK=$(rcli EVALSHA "$SHA" 3 "$DK" bench:rcpt "$RK" 0 86400 1 1 1 c 1 0 hot '' | tr '\n' ' ')
echo "one EVALSHA by redis-cli -> $CHECK" >&2
[[ $CHECK == "ok 1 1 $HUGE " ]] || die "EVALSHA did not answer ok: $CHECK"
rcli HSET "$RK" used 0 ver 0 >/dev/null
redis_bench "redis EVALSHA apply.lua (ops/s)" "redis-benchmark -c 50 -n $REDIS_N" apply \
  EVALSHA "$SHA" 3 "$DK" bench:rcpt "$RK" 0 86400 1 1 1 c 1 0 hot ''
REDIS_USED=$(rcli HGET "$RK" used)
echo "record used after the run: $REDIS_USED (expected $REDIS_N)" >&2
[[ $REDIS_USED == "$REDIS_N" ]] || PROBLEMS+=("apply.lua record used $REDIS_USED after redis-benchmark, expected $REDIS_N")
fi # want quota

ALGORITHMS=(sliding-window sliding-window-approx fixed-window token-bucket)
# the algorithm's code in Redis key names
code_of() {
  case $1 in
    sliding-window) echo sw ;; sliding-window-approx) echo swa ;;
    fixed-window) echo fw ;; token-bucket) echo gcra ;;
  esac
}
WINDOW_MS=3600000 # "1h"
MEM_LINES=()
if want ratelimit; then
want quota && run_echo "echo POST /echo (ceiling, again)"
# ---------------------------------------------------------------- 8. quotad, rate limits
rcli FLUSHALL >/dev/null
start_quotad redis-primary
Q="http://127.0.0.1:$QUOTAD_PORT"
rl_check() { # rl_check BODY -> "<http code> <body>"
  curl -sS -o "$WORK/rl-answer.json" -w '%{http_code}' -H 'Content-Type: application/json' -d "$1" "$Q/ratelimit/check"
  echo " $(cat "$WORK/rl-answer.json")"
}
# API.md: an explicit limit is 1..=1000000, so the "huge" hot limit is 10^6 per 10 s: a hot
# run admits everything as long as it sends fewer than 100k requests a second, and the
# exact sliding window runs in its steady state (members expire as fast as they arrive)
# instead of growing for an hour until it denies. Each algorithm is its own counter (the
# algorithm is in its name).
RL_LIMIT=1000000
RL_WINDOW=10s
RL_WINDOW_MS=10000
for alg in "${ALGORITHMS[@]}"; do
  body="{\"key\":\"hot\",\"limit\":$RL_LIMIT,\"window\":\"$RL_WINDOW\",\"algorithm\":\"$alg\"}"
  answer=$(rl_check "$body")
  echo "check $body -> $answer" >&2
  [[ $answer == 200* ]] || die "POST /ratelimit/check ($alg) did not answer 200: $answer"
  run_wrk "POST /ratelimit/check $alg" "$Q/ratelimit/check" "$BENCH_DIR/ratelimit_check.lua" \
    "hot key, limit 1e6/$RL_WINDOW" "$alg" hot "$RL_LIMIT" "$RL_WINDOW"
  after=$(rl_check "${body%\}},\"cost\":0}")
  echo "after the run, cost-0 check ($alg) -> $after" >&2
  if [[ $alg == sliding-window ]]; then
    members=$(rcli ZCARD "quotad:rl:{hot}:sw$RL_WINDOW_MS")
    bytes=$(rcli MEMORY USAGE "quotad:rl:{hot}:sw$RL_WINDOW_MS" SAMPLES 0)
    NOTES[-1]="hot key, 1e6/$RL_WINDOW; zset ${members} members"
    echo "sliding-window hot key after the run: sorted set of $members members (one per ms with admitted requests), MEMORY USAGE $bytes bytes" >&2
    SW_HOT="$members members, MEMORY USAGE $bytes bytes ($(awk -v b="$bytes" -v m="$members" 'BEGIN { printf "%.0f", m ? b / m : 0 }') bytes per member)"
    # freed in the background now: left to expire, Redis would free the whole set in one
    # go during the next run (a p99 of 3-4 ms in the sliding-window-approx line)
    rcli UNLINK "quotad:rl:{hot}:sw$RL_WINDOW_MS" "quotad:rl:{hot}:sw$RL_WINDOW_MS:sum" >/dev/null
  fi
done
# 100k distinct keys, per algorithm (each algorithm's counters are their own keys). Each
# run starts from an empty Redis: otherwise each algorithm would run beside the 100k keys
# of every run before it (up to 400k keys), and a line's figure would depend on its place.
MANY_RL_KEYS=()
for alg in "${ALGORITHMS[@]}"; do
  rcli FLUSHALL >/dev/null
  ANSWER=$(rl_check "{\"key\":\"ip:1\",\"limit\":1000000,\"window\":\"1h\",\"algorithm\":\"$alg\"}")
  echo "check ip:1 ($alg) -> $ANSWER" >&2
  [[ $ANSWER == 200* ]] || die "POST /ratelimit/check (ip:1, $alg) did not answer 200: $ANSWER"
  run_wrk "POST /ratelimit/check ip:<0..99999> $alg" "$Q/ratelimit/check" "$BENCH_DIR/ratelimit_many.lua" \
    "100k keys, 1e6/1h" "$alg"
  code=$(code_of "$alg")
  n=$(rcli --scan --pattern "quotad:rl:{ip:*}:${code}3600000" | wc -l)
  MANY_RL_KEYS+=("$alg $n")
  echo "distinct ip:<N> $alg counters in Redis after the run: $n" >&2
done
RL_DECISIONS=$(curl -fsS "$Q/metrics" | grep 'decisions' | grep 'ratelimit' | grep -v '^#' || true)
echo "decision metrics (ratelimit):" >&2
echo "$RL_DECISIONS" >&2

# ---------------------------------------------------------------- 9. memory per key
# The starter plan's policy (limit 50, window 1h), written explicitly for each algorithm:
# 50 checks of a fresh key fill it, then MEMORY USAGE (SAMPLES 0: every element counted) of
# each Redis key of that counter, found with SCAN.
log "memory per key: 50 checks of creator:123 per algorithm, limit 50, window 1h"
for alg in "${ALGORITHMS[@]}"; do
  # A realistic key (a creator id); each algorithm has its own counter for it.
  body="{\"key\":\"creator:123\",\"limit\":50,\"window\":\"1h\",\"algorithm\":\"$alg\"}"
  bad=0
  for _ in $(seq 1 50); do
    answer=$(rl_check "$body")
    [[ $answer == 200* ]] || bad=$((bad + 1))
  done
  echo "$alg: 50 checks, non-200: $bad; last answer: $answer" >&2
  ((bad == 0)) || PROBLEMS+=("memory run $alg: $bad of 50 checks not 200 (last: $answer)")
  counter="quotad:rl:{creator:123}:$(code_of "$alg")$WINDOW_MS"
  total=0 names=() namelen=0
  while read -r key; do
    [[ $key == "$counter" || $key == "$counter:sum" ]] || continue
    bytes=$(rcli MEMORY USAGE "$key" SAMPLES 0)
    echo "  $key: $(rcli TYPE "$key") $bytes bytes" >&2
    total=$((total + bytes))
    namelen=$((namelen + ${#key}))
    names+=("${key#"$counter"}")
  done < <(rcli --scan --pattern "quotad:rl:{creator:123}:*")
  ((${#names[@]})) || PROBLEMS+=("memory run $alg: no Redis key named $counter[:sum] found")
  keys=$(printf '%s,' "${names[@]/#/<c>}"); keys=${keys%,}
  MEM_LINES+=("$alg|${#names[@]}|$keys|$total|$namelen|${answer%% *}")
done
stop_pid "$QUOTAD_PID"

# ---------------------------------------------------------------- 10. redis ceiling, ratelimit.lua
log "redis-benchmark EVALSHA of src/storage/redis/scripts/ratelimit.lua (fixed-window)"
rcli FLUSHALL >/dev/null
RL_SHA=$(rcli SCRIPT LOAD "$(cat src/storage/redis/scripts/ratelimit.lua)")
RL_KEYS=('bench:rl:{k}:anomalies' 'bench:rl:{k}:fw')
# One check per call (quotad sends the checks that are ready together in one call; under
# load a call carries several). KEYS: anomaly list, then the counter (a fixed window without
# a plan has neither the exact window's sum nor an attempt counter). ARGV:
# anomaly-list-length, then per item: n (identical checks; 1 here) algorithm limit window-ms cost now('' = Redis TIME)
# plan('' = no anomaly counting; a plan-based check would add its threshold and key).
# The two '' must arrive as empty strings: the answer starting with 1 (allowed) and the
# count below show that they did.
RL_ARGV=(1000 1 fw 1000000000 3600000 1 '' '')
CHECK=$(rcli EVALSHA "$RL_SHA" 2 "${RL_KEYS[@]}" "${RL_ARGV[@]}" | tr '\n' ' ')
echo "one EVALSHA by redis-cli -> $CHECK" >&2
[[ $CHECK == "1 999999999 "* ]] || die "ratelimit.lua EVALSHA did not answer {1, 999999999, ...}: $CHECK"
rcli DEL "${RL_KEYS[@]}" >/dev/null
redis_bench "redis EVALSHA ratelimit.lua fw (ops/s)" "redis-benchmark -c 50 -n $REDIS_N" ratelimit \
  EVALSHA "$RL_SHA" 2 "${RL_KEYS[@]}" "${RL_ARGV[@]}"
RL_COUNT=$(rcli GET 'bench:rl:{k}:fw')
echo "fixed-window count after the run: $RL_COUNT (expected $REDIS_N)" >&2
[[ $RL_COUNT == "$REDIS_N" ]] || PROBLEMS+=("ratelimit.lua fw count $RL_COUNT after redis-benchmark, expected $REDIS_N")
fi # want ratelimit
run_echo "echo POST /echo (ceiling, last)"
stop_pid "$ECHO_PID"
ECHO_RPS=$(for i in "${ECHO_RUNS[@]}"; do echo "${RPS[$i]}"; done | awk '{ s += $1 } END { printf "%.2f", s / NR }')

LOAD_END=$(uptime)
BUSY_END=$(cpu_busy)

# ---------------------------------------------------------------- 11. report
report() {
  echo "quotad benchmark ($MODE)  $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit $COMMIT"
  echo "machine: nproc $NPROC; load average at start: ${LOAD_START#*load average: }; at end: ${LOAD_END#*load average: }"
  echo "CPU busy (1 s sample, before starting anything / after stopping quotad): $BUSY_START / $BUSY_END"
  echo "busiest processes at start (ps %CPU, lifetime average): $TOP_START"
  echo "wrk -t$THREADS -c$CONNS -d$DURATION --latency, all on 127.0.0.1 (load generator on the same $NPROC cores)"
  echo "quotad: target/release/quotad, REDIS_URL=private redis-server $REDIS_PORT (no persistence), no Firestore"
  echo "  (FIRESTORE_PROJECT_ID unset: embedded in-memory ledger), QUOTAD_DEFAULT_LIMIT=$HUGE, RUST_LOG=warn,"
  echo "  QUOTAD_PHASE as in the 'phase' column (redis-primary: no ledger write per request)"
  echo "quotad and the echo ceiling alike: TOKIO_WORKER_THREADS=$WORKERS (BENCH_WORKERS)"
  echo "x echo: req/s over the mean of the ${#ECHO_RUNS[@]} echo runs ($(for i in "${ECHO_RUNS[@]}"; do printf '%.0f ' "${RPS[$i]}"; done | sed 's/ $//'; echo) req/s)"
  echo "srv cpu / redis / other: CPU of the server under test, of redis-server and of everything but them and wrk"
  echo "  during the run (100 % = one core); 'other' above a few % means something else ran (a build, tests)"
  echo
  printf '%-44s %-36s %10s %8s %8s %7s %6s %7s %7s %7s %7s\n' "run" "phase / notes" "req/s" "p50 ms" "p99 ms" "x echo" \
    "non2xx" "sockerr" "srv cpu" "redis" "other"
  local i ratio
  for i in "${!NAMES[@]}"; do
    ratio=$(awk -v a="${RPS[$i]}" -v b="$ECHO_RPS" 'BEGIN { printf "%.2f", a / b }')
    printf '%-44s %-36s %10.0f %8.3f %8.3f %7s %6s %7s %6s%% %6s%% %6s%%\n' "${NAMES[$i]}" "${NOTES[$i]:--}" "${RPS[$i]}" \
      "${P50[$i]}" "${P99[$i]}" "$ratio" "${NON2XX[$i]}" "${SOCKERR[$i]}" "${SRVCPU[$i]}" "${RCPU[$i]}" "${OCPU[$i]}"
  done
  local line name note ops p50 other
  for line in "${REDIS_LINES[@]+"${REDIS_LINES[@]}"}"; do
    IFS=$'\t' read -r name note ops p50 other <<<"$line"
    printf '%-44s %-36s %10.0f %8s %8s %7s %6s %7s %7s %7s %6s%%\n' "$name" "$note" "$ops" "$p50" "-" "-" "-" "-" "-" "-" "$other"
    ((other <= 10)) || PROBLEMS+=("$name: $other % CPU used by other processes during the run")
  done
  echo
  if want ratelimit; then
    echo "rate-limit lines: body {\"key\":\"hot\",\"limit\":$RL_LIMIT,\"window\":\"$RL_WINDOW\",\"algorithm\":\"<alg>\"} (API.md caps an"
    echo "  explicit limit at 10^6, so not 10^9); 429s are expected for none of them (non2xx must be 0)."
    echo "  The exact sliding window keeps one sorted-set member per ms with admitted requests for the window ($RL_WINDOW):"
    echo "  hot key after its run: ${SW_HOT:-?}. A hot run of over 10^5 requests a second would see 429s."
    echo "  ip:<0..99999>: distinct counters in Redis after each run: ${MANY_RL_KEYS[*]}"
    echo "  (a token bucket's key expires once its bucket is full again: at 10^6/1h, 3.6 ms after one request)"
    echo
    echo "memory per key, policy of plan starter (limit 50, window 1h) after 50 checks of a fresh key;"
    echo "MEMORY USAGE <key> SAMPLES 0 summed over the counter's keys (<c> = quotad:rl:{creator:123}:<code>$WINDOW_MS)"
    printf '%-24s %5s %-12s %8s %10s %-18s %s\n' "algorithm" "keys" "names" "bytes" "of names" "target" "50th check"
    local alg n names bytes namelen code target
    for line in "${MEM_LINES[@]}"; do
      IFS='|' read -r alg n names bytes namelen code <<<"$line"
      case $alg in
        token-bucket | sliding-window-approx)
          target="<= 100: $( ((bytes <= 100)) && echo MET || echo NOT MET)" ;;
        *) target="-" ;;
      esac
      printf '%-24s %5s %-12s %8s %10s %-18s %s\n' "$alg" "$n" "$names" "$bytes" "$namelen" "$target" "$code"
    done
    echo "bytes: MEMORY USAGE total (value, key name and Redis's per-key overhead); of names: the key names' length"
    echo "target (issue): GCRA (token-bucket) and the approximate window within 100 bytes per key"
    echo
  fi
  # Targets (issues): consume and every rate-limit check >= 0.6 x echo req/s with p99 <= 2 ms.
  for i in "${!NAMES[@]}"; do
    [[ ${NAMES[$i]} == *consume* || ${NAMES[$i]} == *ratelimit* ]] || continue
    awk -v n="${NAMES[$i]} [${NOTES[$i]}]" -v a="${RPS[$i]}" -v b="$ECHO_RPS" -v p="${P99[$i]}" 'BEGIN {
      r = a / b; ok = (r >= 0.6 && p <= 2.0)
      printf "target %-62s %.2f x echo (>= 0.60), p99 %.3f ms (<= 2 ms): %s\n", n, r, p, ok ? "MET" : "NOT MET" }'
  done
  if ((HAVE_OHA)); then
    echo
    echo "fixed rate: oha -z $DURATION -q $OHA_RATE -c $CONNS --latency-correction"
    printf '%-44s %10s %8s %8s %9s %6s\n' "run" "req/s" "p50 ms" "p99 ms" "p99/echo" "non2xx"
    local echo_p99 name rps p50 p99 bad
    echo_p99=$(cut -f4 <<<"${OHA_LINES[0]}")
    for i in "${!OHA_LINES[@]}"; do
      IFS=$'\t' read -r name rps p50 p99 bad <<<"${OHA_LINES[$i]}"
      printf '%-44s %10.0f %8.3f %8.3f %9s %6s\n' "$name" "$rps" "$p50" "$p99" \
        "$(awk -v a="$p99" -v b="$echo_p99" 'BEGIN { printf "%.2f", a / b }')" "$bad"
    done
    echo "target: quotad's p99 <= 2 x echo's at the same rate"
  elif want quota; then
    echo "oha not on PATH: fixed-rate latency skipped (cargo install oha, ~7 min, then rerun)"
  fi
  for i in "${!NAMES[@]}"; do
    ((OCPU[i] <= 10)) || PROBLEMS+=("${NAMES[$i]} [${NOTES[$i]}]: ${OCPU[$i]} % CPU used by other processes during the run")
    ((NON2XX[i] == 0 && SOCKERR[i] == 0)) ||
      PROBLEMS+=("${NAMES[$i]}: ${NON2XX[$i]} non-2xx, ${SOCKERR[$i]} socket errors")
  done
  if ((${#PROBLEMS[@]})); then
    echo
    echo "PROBLEMS:"
    printf '  %s\n' "${PROBLEMS[@]}"
  fi
}

report | tee "$RESULTS"
echo "written to ${RESULTS#"$ROOT"/}" >&2
STATUS=0
