#!/usr/bin/env bash
# The seckill edge benchmark: `./dev bench seckill_edge [SCENARIO...]`
# (starts the dev stack's Redis, NATS and Postgres, then runs this script).
#
# Scenarios (default: all, in this order):
#   admitted   every attempt is a distinct user on a voucher with stock to spare.
#              Per round: redis-benchmark EVALSHA of the admission script (the
#              Redis ceiling) and of the seed-style script (bench/seed_style.lua,
#              its reference), the minimal axum handler (benches/minimal_handler.rs:
#              the same script over one multiplexed connection, no middleware, no
#              JWT) and the real edge (release binary, JWT verification on), both
#              under the same wrk script and token file. Rounds alternate the order
#              of edge and minimal handler; medians and edge/minimal are reported.
#   sold_out   every attempt on a sold-out voucher, edge only (the in-process flag).
#   forwarder  300,000 admitted requests in a voucher's Redis stream drained into
#              JetStream by Forwarder::forward_voucher (benches/edge_bench.rs).
#   durable    the cost of "admitted means durable" on the dev Redis Cluster
#              (./dev starts it: 3 primaries, a replica each), admitted path as
#              above, per round: the edge without and with SECKILL_ADMIT_REPLICAS=1
#              (the group WAIT), and the alternative design measured on the minimal
#              handler: without and with a JetStream publish acknowledged before
#              the 202 (minimal_handler --jetstream). Reports each design's
#              throughput and p99 against its own baseline. Then the 202s lost
#              when the voucher's primary dies mid-sale, without and with WAIT:
#              ROUNDS runs each of the failover scenario of the edge's tests
#              (tests/it/failover.rs: a cluster of its own, replica frozen
#              0.3 s, primary SIGKILLed, replica promoted), their counts read
#              from its log.
# The admitted scenario first measures a machine reference: wrk GET /ok on a bare
# axum route, redis-benchmark PING, and one JwtKeys::verify.
#
# wrk: -t2 -c64 -d10s --latency (the contract: p99 at 64 connections).
# Every run uses a fresh voucher; everything lives under a random key prefix
# and NATS namespace that are deleted at the end, and every process this script
# starts is stopped by its PID. For every run the script prints the CPU that
# wrk, the server, Redis, nats-server, irq/softirq (loopback TCP) and other
# processes used while wrk sent (from /proc), and CPU µs per request.
# Results: docs/BENCHMARKS.md, "Seckill edge".
#
# Environment (defaults in brackets):
#   BENCH_REDIS_URL [redis://127.0.0.1:56379/]   BENCH_NATS_URL [nats://127.0.0.1:54222]
#   BENCH_REDIS_CLUSTER_URLS [the dev cluster: redis://127.0.0.1:46001/,…46002/,…46003/]
#   BENCH_DATABASE_URL [postgres://citypicks@127.0.0.1:55432/citypicks] (edge, lazy: re-warm only)
#   BENCH_ROUNDS [3]  BENCH_DURATION [10s]  BENCH_CONNECTIONS [64]  BENCH_THREADS [2]
#   BENCH_TOKENS [800000]  BENCH_RB_REQUESTS [300000]  BENCH_RB_CLIENTS [50]
#   BENCH_FORWARDER_ENTRIES [300000]  BENCH_EDGE_PORT [18081]  BENCH_MINIMAL_PORT [18091]
#   BENCH_RUST_LOG [info, the dev stack's level]
#   BENCH_NATS_PID        nats-server's PID, only to attribute CPU to it (./dev sets it)
#   BENCH_MAX_LOAD        when set (e.g. 1.0), wait after the build until the 1-minute
#                         load average is below it (up to BENCH_LOAD_WAIT_SECS [900])
#   BENCH_FORWARDER_BATCH [1000, the edge's SECKILL_FORWARDER_BATCH]
#   CARGO_TARGET_DIR      honoured: the binaries are taken from where cargo puts them
#
# On a shared machine: before every measured run the script waits until the
# machine is idle (at most BENCH_QUIET_MAX_BUSY [10] % busy over 2 s; up to
# BENCH_QUIET_WAIT_SECS [900] per run), and a run during which processes other
# than wrk, the server, Redis and NATS used more than BENCH_FOREIGN_MAX [15] %
# of a core is discarded and repeated (up to BENCH_RETRIES [3] times; the last
# attempt is kept with a warning). Every discarded run is printed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
ROOT="$(cd "$HERE/../.." && pwd -P)"
cd "$ROOT"

REDIS_URL=${BENCH_REDIS_URL:-redis://127.0.0.1:56379/}
CLUSTER_URLS=${BENCH_REDIS_CLUSTER_URLS:-redis://127.0.0.1:46001/,redis://127.0.0.1:46002/,redis://127.0.0.1:46003/}
NATS_URL=${BENCH_NATS_URL:-nats://127.0.0.1:54222}
DATABASE_URL=${BENCH_DATABASE_URL:-postgres://citypicks@127.0.0.1:55432/citypicks}
ROUNDS=${BENCH_ROUNDS:-3}
DURATION=${BENCH_DURATION:-10s}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-2}
TOKENS=${BENCH_TOKENS:-800000}
RB_REQUESTS=${BENCH_RB_REQUESTS:-300000}
RB_CLIENTS=${BENCH_RB_CLIENTS:-50}
FORWARDER_ENTRIES=${BENCH_FORWARDER_ENTRIES:-300000}
EDGE_PORT=${BENCH_EDGE_PORT:-18081}
MINIMAL_PORT=${BENCH_MINIMAL_PORT:-18091}
EDGE_RUST_LOG=${BENCH_RUST_LOG:-info}
FORWARDER_BATCH=${BENCH_FORWARDER_BATCH:-1000}
QUIET_MAX_BUSY=${BENCH_QUIET_MAX_BUSY:-10}
QUIET_WAIT_SECS=${BENCH_QUIET_WAIT_SECS:-900}
FOREIGN_MAX=${BENCH_FOREIGN_MAX:-15}
RETRIES=${BENCH_RETRIES:-3}
STOCK=100000000 # "stock to spare": far more than any run admits
DURATION_SECS=${DURATION%s}
if ! [[ $DURATION_SECS =~ ^[0-9]+$ ]] || ((DURATION_SECS < 2)); then
    echo "error: BENCH_DURATION must be whole seconds, at least 2 (e.g. 10s)" >&2
    exit 1
fi

# redis://HOST:PORT/ -> host and port for redis-cli and redis-benchmark
REDIS_HOSTPORT=${REDIS_URL#redis://}
REDIS_HOSTPORT=${REDIS_HOSTPORT%%/*}
REDIS_HOST=${REDIS_HOSTPORT%:*}
REDIS_PORT=${REDIS_HOSTPORT##*:}

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}
rcli() { redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" "$@"; }
hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

SCENARIOS=("$@")
((${#SCENARIOS[@]} > 0)) || SCENARIOS=(admitted sold_out durable forwarder)
for s in "${SCENARIOS[@]}"; do
    case $s in
    admitted | sold_out | durable | forwarder) ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown scenario '$s' (admitted, sold_out, durable, forwarder)" ;;
    esac
done
wants() {
    local s
    for s in "${SCENARIOS[@]}"; do [[ $s == "$1" ]] && return 0; done
    return 1
}

for tool in wrk redis-benchmark redis-cli curl python3 cargo; do
    command -v "$tool" >/dev/null || die "$tool not found (Debian: apt-get install wrk redis-tools curl python3)"
done
[[ $(rcli ping 2>/dev/null) == PONG ]] || die "no Redis at $REDIS_URL (./dev bench seckill_edge starts it)"

# ------------------------------------------------------------------ build

log "cargo build --release -p seckill-edge --bin seckill-edge --bench minimal_handler --bench edge_bench"
BUILD_JSON=$(cargo build --release -p seckill-edge --bin seckill-edge --bench minimal_handler --bench edge_bench \
    --message-format=json-render-diagnostics) || die "cargo build failed"
executable() {
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])
' "$1" <<<"$BUILD_JSON" | tail -n 1
}
EDGE_BIN=$(executable seckill-edge)
MINIMAL_BIN=$(executable minimal_handler)
HELPER_BIN=$(executable edge_bench)
[[ -x $EDGE_BIN && -x $MINIMAL_BIN && -x $HELPER_BIN ]] || die "the build produced no binaries"

# ---------------------------------------------------------- run state

PREFIX="bench$(hex 4):"
NAMESPACE="b$(hex 5)"
JWT_SECRET=$(hex 32)
export JWT_SECRET
WORK=$(mktemp -d "${TMPDIR:-/tmp}/seckill-bench.XXXXXX")
EDGE_PID="" MINIMAL_PID=""
DURABLE_PIDS=()
helper() { "$HELPER_BIN" --redis-url "$REDIS_URL" --nats-url "$NATS_URL" --prefix "$PREFIX" "$@"; }

# stop PID...: SIGTERM, wait up to 10 s, then SIGKILL
stop() {
    local pid i
    for pid in "$@"; do
        if [[ -n $pid ]]; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
    for pid in "$@"; do
        [[ -n $pid ]] || continue
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}

CLEANED=0
cleanup() {
    ((CLEANED)) && return 0
    CLEANED=1
    stop "$EDGE_PID" "$MINIMAL_PID" "${DURABLE_PIDS[@]}"
    EDGE_PID="" MINIMAL_PID="" DURABLE_PIDS=()
    if wants durable; then cluster_cleanup; fi
    helper cleanup >&2 || printf 'warning: could not delete the keys under %s\n' "$PREFIX" >&2
    helper drop-namespace "$NAMESPACE" >&2 ||
        printf 'warning: could not delete the JetStream streams of %s\n' "$NAMESPACE" >&2
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------ helpers

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_http() {
    local url=$1 want=$2 pid=$3 i code
    for ((i = 0; i < 300; i++)); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 -X "${4:-GET}" "$url" 2>/dev/null || true)
        [[ $code =~ $want ]] && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# CPU ticks (user + system) of processes: PIDs separated by spaces, in one word
proc_ticks() {
    local stat f pid total=0
    for pid in ${1:-}; do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        stat=${stat##*) }
        # after "pid (comm) ": field 3 is the state, utime/stime are fields 14/15 of the line
        read -r -a f <<<"$stat"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}
# busy, total and interrupt (irq + softirq: loopback TCP mostly runs there,
# charged to no process) ticks of the whole machine
machine_ticks() {
    local _cpu user nice system idle iowait irq softirq steal
    read -r _cpu user nice system idle iowait irq softirq steal _ </proc/stat
    echo "$((user + nice + system + irq + softirq + steal)) $((user + nice + system + idle + iowait + irq + softirq + steal)) $((irq + softirq))"
}
# the servers' PIDs, only to attribute CPU (none: not attributed)
REDIS_PID=$(rcli info server | tr -d '\r' | sed -n 's/^process_id://p')
NATS_PID=${BENCH_NATS_PID:-}

# The edge's /metrics count of POST /seckill answers with status $1 (0 when none yet).
edge_status_count() {
    curl -s --max-time 5 "http://127.0.0.1:$EDGE_PORT/metrics" |
        awk -v s="status=\"$1\"" 'index($0, "http_requests_total{") == 1 && index($0, "/seckill/") && index($0, s) { n += $NF } END { printf "%d\n", n }'
}

declare -A R=() # results: R[scenario.server.round.key]
# the last wrk run's RESULT fields (seckill.lua) and the voucher of the last seed
REF_OK=0 REF_OK_CPU="" REF_PING=0 REF_JWT=0
W_requests=0 W_rps=0 W_ok_2xx=0 W_non_2xx=0 W_p50_ms=0 W_p99_ms=0 W_wrapped=0
VOUCHER="" META="" BUYERS="" RELEASED="" STREAM=""
# run_wrk LABEL PORT SERVER_PID VOUCHER: one wrk run. Sets the RESULT fields of
# seckill.lua as W_<key>, and the CPU each process used while wrk sent
# (from the moment every wrk thread is ready until 0.2 s before the end) as
# CPU_<who>, in percent of one core.
run_wrk() {
    local label=$1 port=$2 server_pid=$3 voucher=$4 out="$WORK/wrk.$1.txt" go="$WORK/tokens.go.$4"
    local m0 t0 i0 m1 t1 i1 s0 s1 r0 r1 n0 n1 w0 w1 wrk_pid kv line
    rm -f "$go"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$HERE/seckill.lua" \
        "http://127.0.0.1:$port" -- "$WORK/tokens" "$voucher" "$THREADS" >"$out" 2>&1 &
    wrk_pid=$!
    until [[ -e $go ]]; do
        kill -0 "$wrk_pid" 2>/dev/null || break
        sleep 0.02
    done
    read -r m0 t0 i0 < <(machine_ticks)
    s0=$(proc_ticks "$server_pid") r0=$(proc_ticks "$REDIS_PID") n0=$(proc_ticks "$NATS_PID") w0=$(proc_ticks "$wrk_pid")
    sleep "$(awk -v d="$DURATION_SECS" 'BEGIN { print d - 0.2 }')"
    read -r m1 t1 i1 < <(machine_ticks)
    s1=$(proc_ticks "$server_pid") r1=$(proc_ticks "$REDIS_PID") n1=$(proc_ticks "$NATS_PID") w1=$(proc_ticks "$wrk_pid")
    wait "$wrk_pid" || {
        cat "$out" >&2
        die "wrk failed ($label)"
    }
    rm -f "$go"
    line=$(grep '^RESULT ' "$out") || {
        cat "$out" >&2
        die "wrk printed no RESULT line ($label)"
    }
    for kv in ${line#RESULT }; do printf -v "W_${kv%%=*}" '%s' "${kv#*=}"; done
    pct() { awk -v a="$1" -v w="$(((t1 - t0) / $(nproc)))" 'BEGIN { printf "%.0f", (w > 0 ? 100 * a / w : 0) }'; }
    CPU_server=$(pct $((s1 - s0)))
    CPU_redis=$(pct $((r1 - r0)))
    CPU_nats=$(pct $((n1 - n0)))
    CPU_wrk=$(pct $((w1 - w0)))
    CPU_busy=$(pct $((m1 - m0)))
    CPU_softirq=$(pct $((i1 - i0)))
    CPU_other=$((CPU_busy - CPU_softirq - CPU_server - CPU_redis - CPU_nats - CPU_wrk))
    ((CPU_other >= 0)) || CPU_other=0
}

# Waits until the machine is idle (see the header); gives up with a warning.
wait_quiet() {
    local deadline=$((SECONDS + QUIET_WAIT_SECS)) b0 t0 b1 t1 busy said=0
    while :; do
        read -r b0 t0 _ < <(machine_ticks)
        sleep 2
        read -r b1 t1 _ < <(machine_ticks)
        busy=$((t1 > t0 ? 100 * (b1 - b0) / (t1 - t0) : 0))
        ((busy > QUIET_MAX_BUSY)) || return 0
        if ((SECONDS >= deadline)); then
            log "WARNING: the machine is still $busy % busy after ${QUIET_WAIT_SECS}s of waiting: measuring anyway"
            return 0
        fi
        ((said)) || log "waiting for other processes to finish (machine $busy % busy; load average $(loadavg))"
        said=1
        sleep 8
    done
}

# Other processes took CPU during the last run: true when it should be repeated.
disturbed() { ((CPU_other > FOREIGN_MAX)); }
# repeat_if_disturbed ATTEMPT WHAT: decides after a run whether to run it again.
repeat_if_disturbed() {
    disturbed || return 1
    if (($1 > RETRIES)); then
        log "WARNING: $2: other processes used $CPU_other % of a core; kept after $RETRIES repeats, numbers depressed"
        return 1
    fi
    log "discarded $2: other processes used $CPU_other % of a core; running it again"
}

# run_wrk_ok: the machine reference, GET /ok on the minimal handler (no script),
# with the same CPU accounting as run_wrk (window: 0.5 s after the start to 0.2 s
# before the end).
run_wrk_ok() {
    local out="$WORK/wrk.ok.txt" m0 t0 i0 m1 t1 i1 s0 s1 w0 w1 wrk_pid
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" "http://127.0.0.1:$MINIMAL_PORT/ok" >"$out" 2>&1 &
    wrk_pid=$!
    sleep 0.5
    read -r m0 t0 i0 < <(machine_ticks)
    s0=$(proc_ticks "$MINIMAL_PID") w0=$(proc_ticks "$wrk_pid")
    sleep "$(awk -v d="$DURATION_SECS" 'BEGIN { print d - 0.7 }')"
    read -r m1 t1 i1 < <(machine_ticks)
    s1=$(proc_ticks "$MINIMAL_PID") w1=$(proc_ticks "$wrk_pid")
    wait "$wrk_pid" || die "wrk failed (GET /ok)"
    W_rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
    pct() { awk -v a="$1" -v w="$(((t1 - t0) / $(nproc)))" 'BEGIN { printf "%.0f", (w > 0 ? 100 * a / w : 0) }'; }
    CPU_server=$(pct $((s1 - s0)))
    CPU_wrk=$(pct $((w1 - w0)))
    CPU_softirq=$(pct $((i1 - i0)))
    CPU_busy=$(pct $((m1 - m0)))
    CPU_other=$((CPU_busy - CPU_softirq - CPU_server - CPU_wrk))
    ((CPU_other >= 0)) || CPU_other=0
}

# median of the numbers given
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
fmt() { printf "%'.0f" "$1" 2>/dev/null || printf '%.0f' "$1"; }

# seed STOCK: a fresh voucher; sets VOUCHER, META, BUYERS, RELEASED, STREAM
seed() {
    local out
    out=$(helper seed "$1") || die "could not load a voucher into Redis"
    eval "$out"
}
unlink_voucher() { rcli unlink "$META" "$BUYERS" "$RELEASED" "$STREAM" >/dev/null; }

# ------------------------------------------------------------ start

log "machine: $(nproc) cores, load average $(loadavg); wrk $(wrk -v 2>&1 | awk 'NR==1 { print $2 }'); redis $(rcli info server | tr -d '\r' | sed -n 's/^redis_version://p')"
if [[ -n ${BENCH_MAX_LOAD:-} ]]; then
    deadline=$((SECONDS + ${BENCH_LOAD_WAIT_SECS:-900}))
    until awk -v max="$BENCH_MAX_LOAD" '{ exit !($1 < max) }' /proc/loadavg; do
        ((SECONDS < deadline)) || die "load average still $(loadavg) after ${BENCH_LOAD_WAIT_SECS:-900}s"
        log "waiting for the 1-minute load average to drop below $BENCH_MAX_LOAD (now $(loadavg))"
        sleep 20
    done
fi
START_LOAD=$(loadavg)
log "key prefix $PREFIX, NATS namespace $NAMESPACE, work dir $WORK, load average $START_LOAD"

if wants admitted || wants sold_out || wants durable; then
    log "signing $TOKENS customer JWTs"
    helper tokens "$TOKENS" "$WORK/tokens" --split "$THREADS"
fi
if wants admitted || wants sold_out; then
    for port in "$EDGE_PORT" "$MINIMAL_PORT"; do
        ! port_busy "$port" || die "127.0.0.1:$port is in use (BENCH_EDGE_PORT / BENCH_MINIMAL_PORT)"
    done

    log "starting the edge on 127.0.0.1:$EDGE_PORT (forwarder and sale events off: admission only)"
    SECKILL_EDGE_ADDR=127.0.0.1:$EDGE_PORT SECKILL_KEY_PREFIX=$PREFIX \
        SECKILL_FORWARDER_ENABLED=false SECKILL_SALE_EVENTS_ENABLED=false \
        REDIS_URL=$REDIS_URL NATS_URL=$NATS_URL NATS_NAMESPACE=$NAMESPACE DATABASE_URL=$DATABASE_URL \
        RUST_LOG=$EDGE_RUST_LOG LOG_FORMAT=text STARTUP_TIMEOUT_SECS=30 \
        "$EDGE_BIN" </dev/null >"$WORK/edge.log" 2>&1 &
    EDGE_PID=$!
    log "starting the minimal handler on 127.0.0.1:$MINIMAL_PORT"
    "$MINIMAL_BIN" --addr "127.0.0.1:$MINIMAL_PORT" --redis-url "$REDIS_URL" --prefix "$PREFIX" \
        </dev/null >"$WORK/minimal.log" 2>&1 &
    MINIMAL_PID=$!
    wait_http "http://127.0.0.1:$EDGE_PORT/health" '^200$' "$EDGE_PID" || {
        cat "$WORK/edge.log" >&2
        die "the edge did not become healthy"
    }
    wait_http "http://127.0.0.1:$MINIMAL_PORT/seckill/00000000-0000-0000-0000-000000000000" '^[1-5]' \
        "$MINIMAL_PID" POST || {
        cat "$WORK/minimal.log" >&2
        die "the minimal handler did not start"
    }
fi

# --------------------------------------------------------- admitted path

print_run() {
    printf '  %-8s %-8s %9s req/s  p50 %6.2f ms  p99 %6.2f ms  2xx %s  non-2xx %s  admitted in Redis %s%s\n' \
        "$1" "$2" "$(fmt "$W_rps")" "$W_p50_ms" "$W_p99_ms" "$W_ok_2xx" "$W_non_2xx" "$3" "$4"
    printf '  %-8s %-8s cpu %% of one core: wrk %s, server %s, redis %s, nats %s, irq/softirq %s, other %s; busy %s of %s\n' \
        "" "" "$CPU_wrk" "$CPU_server" "$CPU_redis" "$CPU_nats" "$CPU_softirq" "$CPU_other" "$CPU_busy" "$(($(nproc) * 100))"
    printf '  %-8s %-8s cpu per request: server %s µs, redis %s µs, wrk %s µs, irq/softirq %s µs\n' "" "" \
        "$(per_request "$CPU_server" "$W_rps")" "$(per_request "$CPU_redis" "$W_rps")" \
        "$(per_request "$CPU_wrk" "$W_rps")" "$(per_request "$CPU_softirq" "$W_rps")"
}

# per_request PERCENT_OF_A_CORE RATE: CPU µs per request
per_request() { awk -v p="$1" -v r="$2" 'BEGIN { printf "%.0f", (r > 0 ? p * 10000 / r : 0) }'; }

admitted_run() { # SERVER ROUND
    local attempt
    for ((attempt = 1; ; attempt++)); do
        wait_quiet
        admitted_run_once "$@"
        repeat_if_disturbed "$attempt" "$1 round $2" || break
    done
}

admitted_run_once() { # SERVER ROUND
    local server=$1 round=$2 port pid left extra="" before after
    if [[ $server == edge ]]; then port=$EDGE_PORT pid=$EDGE_PID; else port=$MINIMAL_PORT pid=$MINIMAL_PID; fi
    seed "$STOCK"
    if [[ $server == edge ]]; then before=$(edge_status_count 202); fi
    run_wrk "admitted.$server.$round" "$port" "$pid" "$VOUCHER"
    sleep 0.5 # answers in flight when wrk stopped
    left=$(rcli hget "$META" left)
    local admitted=$((STOCK - left))
    if [[ $server == edge ]]; then
        after=$(edge_status_count 202)
        extra=" (edge /metrics: $((after - before)) x 202)"
    fi
    print_run "$server" "round $round" "$admitted" "$extra"
    ((W_non_2xx == 0)) || log "WARNING: $W_non_2xx non-2xx answers on the admitted path ($server round $round)"
    ((W_wrapped == 0)) || log "WARNING: wrk ran out of tokens ($W_wrapped wraps): raise BENCH_TOKENS"
    # every answered 2xx is an admission in Redis (a few more may have been in flight)
    ((admitted >= W_ok_2xx && admitted <= W_ok_2xx + 2 * CONNECTIONS)) ||
        log "WARNING: Redis admitted $admitted but wrk counted $W_ok_2xx 2xx ($server round $round)"
    R[admitted.$server.$round.rps]=$W_rps
    R[admitted.$server.$round.p99]=$W_p99_ms
    R[admitted.$server.$round.p50]=$W_p50_ms
    R[admitted.$server.$round.non2xx]=$W_non_2xx
    R[admitted.$server.$round.server_us]=$(per_request "$CPU_server" "$W_rps")
    R[admitted.$server.$round.redis_us]=$(per_request "$CPU_redis" "$W_rps")
    R[admitted.$server.$round.cpu]="wrk $CPU_wrk, server $CPU_server, redis $CPU_redis, softirq $CPU_softirq, other $CPU_other"
    unlink_voucher
}

redis_benchmark_run() { # ROUND SCRIPT (admit | seed_style)
    local attempt
    for ((attempt = 1; ; attempt++)); do
        wait_quiet
        redis_benchmark_run_once "$@"
        repeat_if_disturbed "$attempt" "redis-benchmark $2 round $1" || break
    done
}

redis_benchmark_run_once() { # ROUND SCRIPT
    local round=$1 script=$2 sha out left m0 t0 i0 m1 t1 i1 r0 r1 rb_cpu args base
    seed "$STOCK"
    base=${META%:meta}
    if [[ $script == admit ]]; then
        sha=$(rcli script load "$(cat "$ROOT/seckill-edge/lua/admit.lua")")
        # the edge's KEYS and ARGV; every __rand_int__ is drawn anew: a fresh
        # user and order id per call; the time is the edge's (fixed here)
        args=(3 "$META" "$BUYERS" "$STREAM" __rand_int__ __rand_int__ "$(($(date +%s%N) / 1000000))" "" "")
    else
        sha=$(rcli script load "$(cat "$HERE/seed_style.lua")")
        rcli set "$base:seed:stock" "$STOCK" >/dev/null
        args=(3 "$base:seed:stock" "$base:seed:buyers" "$base:seed:stream" __rand_int__ __rand_int__)
    fi
    out="$WORK/redis-benchmark.$script.$round.csv"
    read -r m0 t0 i0 < <(machine_ticks)
    r0=$(proc_ticks "$REDIS_PID")
    local TIMEFORMAT='%3U %3S'
    { time redis-benchmark -h "$REDIS_HOST" -p "$REDIS_PORT" -c "$RB_CLIENTS" -n "$RB_REQUESTS" -r 2000000000 --csv \
        evalsha "$sha" "${args[@]}" >"$out" 2>&1; } 2>"$out.time"
    read -r m1 t1 i1 < <(machine_ticks)
    r1=$(proc_ticks "$REDIS_PID")
    rb_cpu=$(tail -n 1 "$out.time" | awk '{ printf "%.0f", 100 * ($1 + $2) }') # in ticks of 1/100 s
    pct() { awk -v a="$1" -v w="$(((t1 - t0) / $(nproc)))" 'BEGIN { printf "%.0f", (w > 0 ? 100 * a / w : 0) }'; }
    CPU_redis=$(pct $((r1 - r0)))
    CPU_wrk=$(pct "$rb_cpu")
    CPU_softirq=$(pct $((i1 - i0)))
    CPU_busy=$(pct $((m1 - m0)))
    CPU_other=$((CPU_busy - CPU_softirq - CPU_redis - CPU_wrk))
    ((CPU_other >= 0)) || CPU_other=0
    local rps
    rps=$(grep -i '^"evalsha' "$out" | tail -n 1 | awk -F'","' '{ print $2 }')
    [[ -n $rps ]] || {
        cat "$out" >&2
        die "redis-benchmark printed no result"
    }
    if [[ $script == admit ]]; then left=$(rcli hget "$META" left); else left=$(rcli get "$base:seed:stock"); fi
    printf '  %-8s %-10s %-10s %9s calls/s  (%s calls, %s clients; admitted in Redis: %s)\n' \
        redis-benchmark "$script" "round $round" "$(fmt "$rps")" "$RB_REQUESTS" "$RB_CLIENTS" "$((STOCK - left))"
    printf '  %-8s %-8s cpu %% of one core: redis-benchmark %s, redis %s, irq/softirq %s, other %s; busy %s of %s; redis %s µs per call\n' \
        "" "" "$CPU_wrk" "$CPU_redis" "$CPU_softirq" "$CPU_other" "$CPU_busy" "$(($(nproc) * 100))" \
        "$(per_request "$CPU_redis" "$rps")"
    local who=redis
    [[ $script == admit ]] || who=seedref
    R[admitted.$who.$round.redis_us]=$(per_request "$CPU_redis" "$rps")
    R[admitted.$who.$round.rps]=$rps
    rcli unlink "$base:seed:stock" "$base:seed:buyers" "$base:seed:stream" >/dev/null
    unlink_voucher
}

if wants admitted; then
    log "warm-up: 3 s of wrk on each server (not counted)"
    for server in minimal edge; do
        seed "$STOCK"
        if [[ $server == edge ]]; then port=$EDGE_PORT; else port=$MINIMAL_PORT; fi
        wrk -t"$THREADS" -c"$CONNECTIONS" -d3s -s "$HERE/seckill.lua" "http://127.0.0.1:$port" \
            -- "$WORK/tokens" "$VOUCHER" "$THREADS" >/dev/null
        rm -f "$WORK/tokens.go.$VOUCHER"
        unlink_voucher
    done
    sleep 2
    # what this machine does today for any HTTP request and any Redis round trip,
    # to compare with the facts in ARCHITECTURE.md (measured on another day)
    wait_quiet
    log "machine reference: wrk GET /ok on the minimal handler's bare axum route; redis-benchmark PING"
    run_wrk_ok
    REF_OK=$W_rps REF_OK_CPU="server $CPU_server % ($(per_request "$CPU_server" "$W_rps") µs/request), wrk $CPU_wrk %, irq/softirq $CPU_softirq %, other $CPU_other %"
    REF_PING=$(redis-benchmark -h "$REDIS_HOST" -p "$REDIS_PORT" -c "$RB_CLIENTS" -n "$RB_REQUESTS" --csv -t ping_mbulk |
        awk -F'","' '/^"PING_MBULK/ { print $2 }')
    REF_JWT=$(helper jwt-cost | sed -n 's/^JWT_VERIFY micros=\([0-9.]*\).*/\1/p')
    printf '  bare axum GET /ok: %s req/s (cpu %% of one core: %s)\n' "$(fmt "$REF_OK")" "$REF_OK_CPU"
    printf '  redis-benchmark PING (%s clients): %s/s; one JWT verification (JwtKeys::verify, one core): %s µs\n' \
        "$RB_CLIENTS" "$(fmt "$REF_PING")" "$REF_JWT"
    sleep 2
    log "admitted path: $ROUNDS rounds of redis-benchmark, minimal handler and edge (wrk -t$THREADS -c$CONNECTIONS -d$DURATION)"
    for ((round = 1; round <= ROUNDS; round++)); do
        # the script and its reference back to back, in alternating order
        if ((round % 2)); then scripts=(admit seed_style); else scripts=(seed_style admit); fi
        for script in "${scripts[@]}"; do redis_benchmark_run "$round" "$script"; done
        R[admitted.script.$round.ratio]=$(ratio "${R[admitted.redis.$round.rps]}" "${R[admitted.seedref.$round.rps]}")
        if ((round % 2)); then order=(minimal edge); else order=(edge minimal); fi
        for server in "${order[@]}"; do admitted_run "$server" "$round"; done
    done
fi

# --------------------------------------------------------- sold-out path

if wants sold_out; then
    log "sold-out path: $ROUNDS rounds on the edge (a voucher with no stock left)"
    seed 0
    for ((round = 1, attempt = 1; round <= ROUNDS; attempt++)); do
        wait_quiet
        b409=$(edge_status_count 409) b202=$(edge_status_count 202)
        run_wrk "sold_out.edge.$round" "$EDGE_PORT" "$EDGE_PID" "$VOUCHER"
        sleep 0.5
        n409=$(($(edge_status_count 409) - b409)) n202=$(($(edge_status_count 202) - b202))
        print_run edge "round $round" "$(($(rcli hget "$META" stock) - $(rcli hget "$META" left)))" \
            " (edge /metrics: $n409 x 409, $n202 x 202)"
        ((W_ok_2xx == 0)) || log "WARNING: $W_ok_2xx 2xx answers on the sold-out path"
        ((n409 >= W_requests)) || log "WARNING: the edge counted $n409 x 409 for $W_requests answers"
        repeat_if_disturbed "$attempt" "sold-out round $round" && continue
        R[sold_out.edge.$round.rps]=$W_rps
        R[sold_out.edge.$round.p99]=$W_p99_ms
        R[sold_out.edge.$round.p50]=$W_p50_ms
        R[sold_out.edge.$round.server_us]=$(per_request "$CPU_server" "$W_rps")
        R[sold_out.edge.$round.cpu]="wrk $CPU_wrk, server $CPU_server, redis $CPU_redis, softirq $CPU_softirq, other $CPU_other"
        # the reference of this round: a bare axum route answering a fixed body
        wait_quiet
        run_wrk_ok
        R[sold_out.ok.$round.rps]=$W_rps
        R[sold_out.ratio.$round.rps]=$(ratio "${R[sold_out.edge.$round.rps]}" "$W_rps")
        printf '  %-8s %-10s %9s req/s  (bare axum GET /ok, the reference; edge / it %s)\n' \
            "/ok" "round $round" "$(fmt "$W_rps")" "${R[sold_out.ratio.$round.rps]}"
        round=$((round + 1)) attempt=0
    done
    unlink_voucher
fi

stop "$EDGE_PID" "$MINIMAL_PID"
EDGE_PID="" MINIMAL_PID=""

# ---------------------------------------------------- durable (cluster)

# host:port of the cluster's seed nodes, for redis-cli
CLUSTER_PORTS=()
for url in ${CLUSTER_URLS//,/ }; do
    hostport=${url#redis://}
    CLUSTER_PORTS+=("${hostport%%/*}")
done
# every node (primaries and replicas) the seed nodes know
cluster_nodes() {
    redis-cli -h "${CLUSTER_PORTS[0]%:*}" -p "${CLUSTER_PORTS[0]##*:}" cluster nodes |
        awk '{ split($2, a, "@"); print a[1] }'
}
# the primary holding KEY (host:port)
cluster_primary_of() {
    local node
    for node in $(cluster_nodes); do
        if [[ $(redis-cli -h "${node%:*}" -p "${node##*:}" exists "$1" 2>/dev/null) == 1 ]]; then
            echo "$node"
            return 0
        fi
    done
    return 1
}
cluster_cleanup() {
    local node key
    for node in $(cluster_nodes 2>/dev/null); do
        redis-cli -h "${node%:*}" -p "${node##*:}" --scan --pattern "$PREFIX*" 2>/dev/null |
            while read -r key; do
                redis-cli -h "${node%:*}" -p "${node##*:}" unlink "$key" >/dev/null 2>&1 || true
            done
    done
}

durable_run() { # SERVER PORT PID ROUND
    local attempt
    for ((attempt = 1; ; attempt++)); do
        wait_quiet
        durable_run_once "$@"
        repeat_if_disturbed "$attempt" "$1 round $4" || break
    done
}

durable_run_once() { # SERVER PORT PID ROUND
    local server=$1 port=$2 pid=$3 round=$4 out primary left
    out=$(helper --redis-url "$CLUSTER_URLS" seed "$STOCK") || die "could not load a voucher into the cluster"
    eval "$out"
    primary=$(cluster_primary_of "$META") || die "no primary holds $META"
    # CPU attributed to "redis": every node of the cluster (the primary and
    # the replica it streams to, mostly)
    REDIS_PID=$(for node in $(cluster_nodes); do
        redis-cli -h "${node%:*}" -p "${node##*:}" info server | tr -d '\r' | sed -n 's/^process_id://p'
    done | tr '\n' ' ')
    run_wrk "durable.$server.$round" "$port" "$pid" "$VOUCHER"
    sleep 0.5 # answers in flight when wrk stopped
    left=$(redis-cli -h "${primary%:*}" -p "${primary##*:}" hget "$META" left)
    print_run "$server" "round $round" "$((STOCK - left))" " (primary $primary)"
    R[durable.$server.$round.rps]=$W_rps
    R[durable.$server.$round.p99]=$W_p99_ms
    R[durable.$server.$round.non2xx]=$W_non_2xx
    R[durable.$server.$round.server_us]=$(per_request "$CPU_server" "$W_rps")
    redis-cli -h "${primary%:*}" -p "${primary##*:}" unlink "$META" "$BUYERS" "$RELEASED" "$STREAM" >/dev/null
}

if wants durable; then
    [[ $(redis-cli -h "${CLUSTER_PORTS[0]%:*}" -p "${CLUSTER_PORTS[0]##*:}" cluster info 2>/dev/null) == *cluster_state:ok* ]] ||
        die "no Redis Cluster at $CLUSTER_URLS (./dev redis-cluster up; ./dev bench seckill_edge starts it)"
    DURABLE_SERVERS=(edge edge_wait minimal minimal_js)
    declare -A DPORT=([edge]=$((EDGE_PORT + 1)) [edge_wait]=$((EDGE_PORT + 2)) [minimal]=$((MINIMAL_PORT + 1)) [minimal_js]=$((MINIMAL_PORT + 2)))
    declare -A DPID=()
    for server in "${DURABLE_SERVERS[@]}"; do
        ! port_busy "${DPORT[$server]}" || die "127.0.0.1:${DPORT[$server]} is in use"
        case $server in
        edge | edge_wait)
            replicas=0
            [[ $server == edge_wait ]] && replicas=1
            SECKILL_EDGE_ADDR=127.0.0.1:${DPORT[$server]} SECKILL_KEY_PREFIX=$PREFIX SECKILL_ADMIT_REPLICAS=$replicas \
                SECKILL_FORWARDER_ENABLED=false SECKILL_SALE_EVENTS_ENABLED=false \
                REDIS_CLUSTER=true REDIS_URL=$CLUSTER_URLS NATS_URL=$NATS_URL NATS_NAMESPACE=$NAMESPACE \
                DATABASE_URL=$DATABASE_URL RUST_LOG=$EDGE_RUST_LOG LOG_FORMAT=text STARTUP_TIMEOUT_SECS=30 \
                "$EDGE_BIN" </dev/null >"$WORK/$server.log" 2>&1 &
            ;;
        minimal) "$MINIMAL_BIN" --addr "127.0.0.1:${DPORT[$server]}" --redis-url "$CLUSTER_URLS" --prefix "$PREFIX" \
            </dev/null >"$WORK/$server.log" 2>&1 & ;;
        minimal_js) "$MINIMAL_BIN" --addr "127.0.0.1:${DPORT[$server]}" --redis-url "$CLUSTER_URLS" --prefix "$PREFIX" \
            --jetstream "$NATS_URL" </dev/null >"$WORK/$server.log" 2>&1 & ;;
        esac
        DPID[$server]=$!
        DURABLE_PIDS+=("$!")
        wait_http "http://127.0.0.1:${DPORT[$server]}/seckill/00000000-0000-0000-0000-000000000000" '^[1-5]' \
            "${DPID[$server]}" POST || {
            cat "$WORK/$server.log" >&2
            die "$server did not start on the cluster"
        }
    done
    log "durable: $ROUNDS rounds on the Redis Cluster $CLUSTER_URLS (wrk -t$THREADS -c$CONNECTIONS -d$DURATION)"
    SINGLE_REDIS_PID=$REDIS_PID # run_wrk's "redis" is the cluster's here
    for ((round = 1; round <= ROUNDS; round++)); do
        order=("${DURABLE_SERVERS[@]}")
        # alternate the order, as the admitted scenario does
        ((round % 2 == 0)) && order=(minimal_js minimal edge_wait edge)
        for server in "${order[@]}"; do
            durable_run "$server" "${DPORT[$server]}" "${DPID[$server]}" "$round"
        done
    done
    stop "${DURABLE_PIDS[@]}"
    DURABLE_PIDS=()
    REDIS_PID=$SINGLE_REDIS_PID

    # 202s lost when the primary dies: the failover scenario of the tests
    log "durable: 202s lost when the voucher's primary dies mid-sale ($ROUNDS runs without and with WAIT)"
    for ((round = 1; round <= ROUNDS; round++)); do
        for mode in no_wait wait; do
            case $mode in
            no_wait) test=failover::the_edge_admits_again_soon_after_a_promotion_while_the_dead_primary_stays_down ;;
            wait) test=failover::no_admission_answered_202_is_lost_when_the_vouchers_primary_dies ;;
            esac
            out=$(SQLX_OFFLINE=true TEST_NATS_URL=$NATS_URL RUST_LOG=warn,it=info \
                cargo test -q -p seckill-edge --test it -- --exact "$test" --nocapture 2>&1 |
                sed 's/\x1b\[[0-9;]*m//g' | grep 'sale through a failover' || true)
            answered=$(sed -n 's/.*answered=\([0-9]*\).*/\1/p' <<<"$out")
            lost=$(sed -n 's/.* lost=\([0-9]*\).*/\1/p' <<<"$out")
            [[ -n $answered && -n $lost ]] || die "the failover scenario ($mode) printed no counts"
            printf '  failover %-8s round %s: answered 202 %s, lost %s\n' "$mode" "$round" "$answered" "$lost"
            R[failover.$mode.$round.answered]=$answered
            R[failover.$mode.$round.lost]=$lost
        done
    done
fi
rm -f "$WORK"/tokens.*

# ------------------------------------------------------------ forwarder

FORWARDER_MEDIAN=""
if wants forwarder; then
    log "forwarder: $FORWARDER_ENTRIES requests from a Redis stream into JetStream, $ROUNDS rounds"
    helper forwarder --entries "$FORWARDER_ENTRIES" --rounds "$ROUNDS" --batch "$FORWARDER_BATCH" \
        --watch "redis=$REDIS_PID,nats=$NATS_PID" --quiet-max-busy "$QUIET_MAX_BUSY" \
        --quiet-wait-secs "$QUIET_WAIT_SECS" --foreign-max "$FOREIGN_MAX" --retries "$RETRIES" |
        tee "$WORK/forwarder.txt"
    FORWARDER_MEDIAN=$(sed -n 's/^FORWARDER_MEDIAN rate=\([0-9]*\).*/\1/p' "$WORK/forwarder.txt")
fi

# -------------------------------------------------------------- summary

collect() { # SCENARIO SERVER KEY -> the rounds' values
    local r out=()
    for ((r = 1; r <= ROUNDS; r++)); do out+=("${R[$1.$2.$r.$3]}"); done
    echo "${out[@]}"
}
verdict() { awk -v v="$1" -v t="$2" -v op="$3" 'BEGIN { ok = (op == "ge" ? v >= t : v <= t); print (ok ? "met" : "NOT met") }'; }

echo
echo "## seckill edge benchmark: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, load average at start $START_LOAD, at end $(loadavg)"
if wants admitted; then
    # shellcheck disable=SC2046 # word splitting of the rounds' values is intended
    {
        e=$(median $(collect admitted edge rps))
        m=$(median $(collect admitted minimal rps))
        rb=$(median $(collect admitted redis rps))
        sr=$(median $(collect admitted seedref rps))
        sratio=$(median $(collect admitted script ratio))
        ep99=$(median $(collect admitted edge p99))
        mp99=$(median $(collect admitted minimal p99))
        ep50=$(median $(collect admitted edge p50))
        mp50=$(median $(collect admitted minimal p50))
    }
    echo "machine reference: bare axum GET /ok $(fmt "$REF_OK") req/s ($REF_OK_CPU); redis-benchmark PING $(fmt "$REF_PING")/s; JWT verify $REF_JWT µs (one core)"
    echo "admitted path (wrk -t$THREADS -c$CONNECTIONS -d$DURATION, $ROUNDS rounds, medians):"
    echo "  edge (JWT on)        $(fmt "$e") req/s  p50 $ep50 ms  p99 $ep99 ms   rounds: $(collect admitted edge rps)"
    echo "  minimal handler      $(fmt "$m") req/s  p50 $mp50 ms  p99 $mp99 ms   rounds: $(collect admitted minimal rps)"
    echo "  admission script     $(fmt "$rb") calls/s ($RB_CLIENTS clients, redis-benchmark)   rounds: $(collect admitted redis rps)"
    echo "  seed-style script    $(fmt "$sr") calls/s (the reference, same Redis)   rounds: $(collect admitted seedref rps)"
    echo "  script / seed-style  $sratio (median of the rounds' ratios: $(collect admitted script ratio))"
    echo "  edge / minimal       $(ratio "$e" "$m")   edge / admission script $(ratio "$e" "$rb")   minimal / admission script $(ratio "$m" "$rb")"
    echo "  targets: script >= 0.8x seed-style: $(verdict "$sratio" 0.8 ge); edge >= 0.9x minimal: $(verdict "$(ratio "$e" "$m")" 0.9 ge); edge p99 <= 10 ms: $(verdict "$ep99" 10 le)"
    # shellcheck disable=SC2046
    echo "  cpu per request (medians): server: edge $(median $(collect admitted edge server_us)) µs, minimal $(median $(collect admitted minimal server_us)) µs;" \
        "redis: edge run $(median $(collect admitted edge redis_us)) µs, minimal run $(median $(collect admitted minimal redis_us)) µs, redis-benchmark $(median $(collect admitted redis redis_us)) µs"
    for ((r = 1; r <= ROUNDS; r++)); do
        echo "  cpu% round $r (of 200): edge run: ${R[admitted.edge.$r.cpu]}; minimal run: ${R[admitted.minimal.$r.cpu]}"
    done
fi
if wants sold_out; then
    # shellcheck disable=SC2046
    {
        s=$(median $(collect sold_out edge rps))
        sp99=$(median $(collect sold_out edge p99))
        sp50=$(median $(collect sold_out edge p50))
    }
    # shellcheck disable=SC2046
    sratio=$(median $(collect sold_out ratio rps))
    echo "sold-out path (edge):  $(fmt "$s") req/s  p50 $sp50 ms  p99 $sp99 ms   rounds: $(collect sold_out edge rps)"
    echo "  bare axum GET /ok (reference, same rounds): $(collect sold_out ok rps)"
    echo "  edge / bare route    $sratio (median of the rounds' ratios: $(collect sold_out ratio rps))   target >= 0.5x: $(verdict "$sratio" 0.5 ge)"
    # shellcheck disable=SC2046
    echo "  edge cpu per request (median): $(median $(collect sold_out edge server_us)) µs"
    for ((r = 1; r <= ROUNDS; r++)); do echo "  cpu% round $r (of 200): ${R[sold_out.edge.$r.cpu]}"; done
fi
if wants durable; then
    # shellcheck disable=SC2046
    {
        de=$(median $(collect durable edge rps))
        dw=$(median $(collect durable edge_wait rps))
        dm=$(median $(collect durable minimal rps))
        dj=$(median $(collect durable minimal_js rps))
    }
    echo "durable 202 on the Redis Cluster (wrk -t$THREADS -c$CONNECTIONS -d$DURATION, $ROUNDS rounds, medians):"
    for server in edge edge_wait minimal minimal_js; do
        # shellcheck disable=SC2046
        printf '  %-28s %9s req/s  p99 %6s ms  non-2xx %s  server %s µs/request   rounds: %s\n' \
            "$(case $server in edge) echo "edge, no WAIT" ;; edge_wait) echo "edge, WAIT 1 (group)" ;;
                minimal) echo "minimal handler" ;; minimal_js) echo "minimal + JetStream ack" ;; esac)" \
            "$(fmt "$(median $(collect durable "$server" rps))")" "$(median $(collect durable "$server" p99))" \
            "$(collect durable "$server" non2xx | tr ' ' '+')" "$(median $(collect durable "$server" server_us))" \
            "$(collect durable "$server" rps)"
    done
    echo "  WAIT's cost: edge with / without   $(ratio "$dw" "$de")"
    echo "  JetStream's cost: minimal with / without   $(ratio "$dj" "$dm")"
    echo "  202s lost when the voucher's primary dies (runs): without WAIT $(collect failover no_wait lost | tr ' ' '/') of $(collect failover no_wait answered | tr ' ' '/');" \
        "with WAIT $(collect failover wait lost | tr ' ' '/') of $(collect failover wait answered | tr ' ' '/')"
    lost_with=0
    for v in $(collect failover wait lost); do lost_with=$((lost_with + v)); done
    echo "  target: 0 lost with WAIT: $( ((lost_with == 0)) && echo met || echo "NOT met")"
fi
if [[ -n $FORWARDER_MEDIAN ]]; then
    echo "forwarder: $(fmt "$FORWARDER_MEDIAN") requests/s (median of $ROUNDS x $FORWARDER_ENTRIES)   target >= 30,000/s: $(verdict "$FORWARDER_MEDIAN" 30000 ge)"
fi
