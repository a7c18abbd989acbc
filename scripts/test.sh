#!/usr/bin/env bash
# Run quotad's whole test suite against a real redis-server and the Firestore emulator.
#
#   scripts/test.sh                             every test: cargo test --all-targets, then the
#                                               TypeScript client's (node --test, against the
#                                               debug binary cargo test built)
#   scripts/test.sh [cargo test args...]        cargo test --all-targets [args...] only
#   scripts/test.sh -- --nocapture              args after `--` go to the test binaries, as usual
#   scripts/test.sh --servers-only -- CMD...    start the servers, run CMD instead of cargo test
#                                               (same env; handy for one test, a benchmark or the
#                                               conformance kit against real servers)
#   scripts/test.sh -h | --help
#
# It starts a private redis-server (no persistence) and `gcloud emulators firestore start`
# on free loopback ports, waits until both answer, exports
#
#   QUOTAD_TEST_REDIS_URL     redis://127.0.0.1:<port>
#   QUOTAD_TEST_REDIS_PORT    <port>
#   QUOTAD_TEST_REDIS_SERVER  path of redis-server (for tests that start their own)
#   FIRESTORE_EMULATOR_HOST   127.0.0.1:<port>
#
# runs the command, and stops both servers (and whatever the command left behind) on exit,
# Ctrl-C or SIGTERM. The exit status is the command's.
#
# Env: QUOTAD_CONFORMANCE=1 also runs ../shared/conformance/run.sh (when it exists) after
# cargo test passes; it builds release and starts its own servers. Off by default.
#
# Needs: redis-server (installed with apt-get when missing), the Google Cloud CLI with the
# cloud-firestore-emulator component and Java (never installed here: it says what is missing
# and fails; it never skips), curl, python3 (free ports).
set -euo pipefail

say() { printf '==> %s\n' "$*"; }
die() { printf '==> error: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

# ----------------------------------------------------------------------------- arguments

servers_only=0
full_suite=0 # no arguments: cargo test, then the TypeScript client's tests
cmd=()
case "${1:-}" in
    -h | --help)
        usage
        exit 0
        ;;
    --servers-only)
        servers_only=1
        shift
        [[ "${1:-}" == "--" ]] && shift
        (($# > 0)) || die "--servers-only needs a command: scripts/test.sh --servers-only -- CMD..."
        cmd=("$@")
        ;;
    *)
        full_suite=$(( $# == 0 ))
        cmd=(cargo test --all-targets "$@")
        ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo_root="$PWD"

# ----------------------------------------------------------------------------- prerequisites

if [[ ! -x /usr/bin/redis-server ]] && ! command -v redis-server >/dev/null 2>&1; then
    say "redis-server is missing: installing the Debian package redis-server"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } >/dev/null; then
        die "could not install redis-server: install the Debian package 'redis-server' (apt-get install redis-server)"
    fi
fi
redis_server="$(command -v redis-server || echo /usr/bin/redis-server)"
[[ -x "$redis_server" ]] || die "redis-server not found: install the Debian package 'redis-server'"
command -v redis-cli >/dev/null 2>&1 ||
    die "redis-cli not found: install the Debian package 'redis-tools' (it comes with redis-server)"

emulator_help="the Firestore emulator needs the Google Cloud CLI component 'cloud-firestore-emulator'
    (Debian package 'google-cloud-cli-firestore-emulator', from Google's apt repository, which
    brings 'google-cloud-cli'; or 'gcloud components install cloud-firestore-emulator')
    and a Java 17+ runtime (Debian package 'openjdk-17-jre-headless')"
command -v gcloud >/dev/null 2>&1 || die "gcloud is not on PATH: $emulator_help"
command -v java >/dev/null 2>&1 || die "java is not on PATH: $emulator_help"
sdk_root="$(dirname "$(dirname "$(readlink -f "$(command -v gcloud)")")")"
[[ -d "$sdk_root/platform/cloud-firestore-emulator" ]] ||
    die "no cloud-firestore-emulator component under $sdk_root/platform: $emulator_help"
command -v curl >/dev/null 2>&1 || die "curl not found: install the Debian package 'curl'"
command -v setsid >/dev/null 2>&1 || die "setsid not found: install the Debian package 'util-linux'"

# ----------------------------------------------------------------------------- cleanup

tmp="$(mktemp -d "${TMPDIR:-/tmp}/quotad-test.XXXXXX")"
redis_pid=""
emulator_pid=""
child_pid=""
child_name=""

# Each process below is started with setsid, so its pid is also its process group id and
# signalling the group reaches its children too (the emulator's JVM is gcloud's grandchild).
stop_group() { # name pgid first-signal grace-seconds
    local name="$1" pgid="$2" sig="${3:-TERM}" grace="${4:-5}" i
    [[ -n "$pgid" ]] || return 0
    if kill -0 -- "-$pgid" 2>/dev/null; then
        kill "-$sig" -- "-$pgid" 2>/dev/null || true
        for ((i = 0; i < grace * 10; i++)); do
            kill -0 -- "-$pgid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 -- "-$pgid" 2>/dev/null; then
            say "$name did not stop within ${grace} s of SIG$sig: SIGKILL"
            kill -KILL -- "-$pgid" 2>/dev/null || true
        fi
    fi
    wait "$pgid" 2>/dev/null || true
}

stop_servers() {
    if [[ -n "$emulator_pid" || -n "$redis_pid" ]]; then
        say "stopping the Firestore emulator and redis-server"
    fi
    stop_group "the Firestore emulator" "$emulator_pid"
    emulator_pid=""
    stop_group "redis-server" "$redis_pid"
    redis_pid=""
}

cleanup() {
    local status=$?
    trap '' INT TERM # finish cleaning up even when interrupted again
    if [[ -n "$child_pid" ]]; then
        # SIGINT first, as Ctrl-C would: lets a test runner tear down what it started.
        stop_group "$child_name" "$child_pid" INT 10
        child_pid=""
    fi
    stop_servers
    rm -rf -- "$tmp"
    exit "$status"
}

on_signal() { # signal name, exit status
    say "interrupted by SIG$1: stopping"
    exit "$2" # runs cleanup through the EXIT trap
}

trap cleanup EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP

# ----------------------------------------------------------------------------- servers

free_ports() { # count: prints that many distinct free loopback ports, one a line
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
EOF
}

command -v python3 >/dev/null 2>&1 || die "python3 not found (used to find free ports)"
mapfile -t ports < <(free_ports 2)
((${#ports[@]} == 2)) || die "could not find two free ports"
redis_port="${ports[0]}"
emulator_port="${ports[1]}"

say "starting redis-server on 127.0.0.1:$redis_port (log: $tmp/redis.log)"
setsid "$redis_server" --port "$redis_port" --bind 127.0.0.1 --daemonize no \
    --save "" --appendonly no --dir "$tmp" --logfile "$tmp/redis.log" </dev/null >/dev/null 2>&1 &
redis_pid=$!

say "starting the Firestore emulator on 127.0.0.1:$emulator_port (log: $tmp/firestore.log)"
CLOUDSDK_CORE_DISABLE_PROMPTS=1 setsid gcloud emulators firestore start \
    --host-port="127.0.0.1:$emulator_port" </dev/null >"$tmp/firestore.log" 2>&1 &
emulator_pid=$!

log_tail() { # file
    say "last lines of $1:"
    tail -n 40 "$1" 2>/dev/null | sed 's/^/    /' || true
}

deadline=$((SECONDS + 15))
until [[ "$(redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null)" == PONG ]]; do
    if ! kill -0 "$redis_pid" 2>/dev/null; then
        log_tail "$tmp/redis.log"
        die "redis-server exited before answering PING"
    fi
    if ((SECONDS >= deadline)); then
        log_tail "$tmp/redis.log"
        die "redis-server did not answer PING within 15 s"
    fi
    sleep 0.1
done
say "redis-server is up"

deadline=$((SECONDS + 90))
until [[ "$(curl -s -m 2 "http://127.0.0.1:$emulator_port/" 2>/dev/null | tr -d '[:space:]')" == Ok ]]; do
    if ! kill -0 "$emulator_pid" 2>/dev/null; then
        log_tail "$tmp/firestore.log"
        die "the Firestore emulator exited before it was ready"
    fi
    if ((SECONDS >= deadline)); then
        log_tail "$tmp/firestore.log"
        die "the Firestore emulator did not answer Ok within 90 s"
    fi
    sleep 0.2
done
say "the Firestore emulator is up"

export QUOTAD_TEST_REDIS_URL="redis://127.0.0.1:$redis_port"
export QUOTAD_TEST_REDIS_PORT="$redis_port"
export QUOTAD_TEST_REDIS_SERVER="$redis_server"
export FIRESTORE_EMULATOR_HOST="127.0.0.1:$emulator_port"

# ----------------------------------------------------------------------------- the command

# run_child NAME CMD...: runs CMD and returns its exit status. In the background with
# `wait`, so that a signal to this script runs its trap at once instead of after CMD ends.
# setsid gives CMD a process group of its own (cleanup reaches anything it spawned);
# `env --default-signal` undoes the SIGINT/SIGQUIT ignore that bash gives background
# commands, so CMD and the processes it starts keep the default handling.
run_child() {
    local rc=0
    child_name="$1"
    shift
    if true 3<&0 2>/dev/null; then # stdin is open (CI may close it)
        setsid env --default-signal=INT,QUIT "$@" <&0 &
    else
        setsid env --default-signal=INT,QUIT "$@" </dev/null &
    fi
    child_pid=$!
    wait "$child_pid" || rc=$?
    if kill -0 -- "-$child_pid" 2>/dev/null; then # e.g. a server a test started and left
        say "stopping what $child_name left running"
        stop_group "$child_name" "$child_pid" TERM 5
    fi
    child_pid=""
    return "$rc"
}

say "running:$(printf ' %q' "${cmd[@]}")"
status=0
run_child "${cmd[0]}" "${cmd[@]}" || status=$?
if ((status != 0)); then
    say "${cmd[0]} failed (exit status $status)"
    exit "$status"
fi
say "${cmd[0]} passed"

# The TypeScript client (clients/typescript) is tested against the real binary: the debug
# build cargo test has just made (a release build would double the build's time and disk;
# release builds are for benchmarks).
if ((full_suite)); then
    command -v npm >/dev/null || die "npm is missing: install Node.js >= 18 (Debian: nodejs npm) for the client's tests"
    status=0
    run_child "cargo build" cargo build --bin quotad || status=$?
    ((status == 0)) || { say "the build failed (exit status $status)"; exit "$status"; }
    say "running the TypeScript client's tests"
    QUOTAD_BIN="$repo_root/target/debug/quotad" \
        run_child "the client tests" bash "$repo_root/clients/typescript/test.sh" || status=$?
    if ((status != 0)); then
        say "the client tests failed (exit status $status)"
        exit "$status"
    fi
    say "the client tests passed"
fi

if ((!servers_only)) && [[ "${QUOTAD_CONFORMANCE:-0}" == 1 ]]; then
    conformance="$repo_root/../shared/conformance/run.sh"
    if [[ -f "$conformance" ]]; then
        stop_servers # it starts its own
        say "QUOTAD_CONFORMANCE=1: running $conformance"
        status=0
        run_child "the conformance suite" bash "$conformance" || status=$?
        if ((status != 0)); then
            say "the conformance suite failed (exit status $status)"
            exit "$status"
        fi
        say "the conformance suite passed"
    else
        say "QUOTAD_CONFORMANCE=1 but $conformance does not exist: not running it"
    fi
fi
