#!/usr/bin/env bash
# Capacity figures for sizing kmi-proxy replicas (deploy/README.md quotes its output).
#
#   benches/capacity.sh                 # from the repository root; about 2 minutes after the build
#
# Loopback only, bounded in time. It starts `kmi-proxy demo` (a built-in origin serving a ~1.6 KB
# HTML page with partner links, plus a proxy we do not use) and, in a second process, kmi-proxy
# as it is deployed: its own config file, JSON access log, admin listener, upstream = the demo
# origin. Only that second process is measured, so the origin's CPU is not counted as the
# proxy's. Then:
#
#   1. memory: idle RSS, then IDLE_CONNS (1000) keep-alive connections that each fetch the page
#      once and stay open; (RSS after - RSS before) / IDLE_CONNS is the memory per connection;
#   2. CPU: a warm-up, then `wrk -t2 -c64 -d10s` with an identity cookie (every response is
#      rewritten and its partner links decorated); the proxy's utime+stime from /proc/PID/stat
#      over the run, divided by the requests served, is CPU-seconds per request, i.e. cores per
#      1,000 requests/s once multiplied by 1,000;
#   3. memory per rewritten stream in flight: `cargo bench --bench pressure -- streams` holds
#      200 h2c streams of the 119 KB Cloudflare corpus page halfway through their bodies, for
#      no ID (passed through), identity, gzip and brotli, each in a fresh proxy, and prints the
#      RSS they add per stream in flight (KMI_STREAMS, KMI_STREAM_CONNECTIONS change the load).
#
# Environment: DURATION (10s), CONNS (64), THREADS (2), IDLE_CONNS (1000), WARMUP (3s).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
IDLE_CONNS=${IDLE_CONNS:-1000}
WARMUP=${WARMUP:-3s}
COOKIE='km_ai=Zk9%2BaB%2Fc3Q%3D%3D'
DECORATED='kmi=Zk9%2BaB%2Fc3Q%3D%3D'

say() { printf '%s\n' "$*"; }
die() {
    printf 'capacity.sh: %s\n' "$*" >&2
    exit 1
}

command -v python3 >/dev/null || die "python3 is needed (apt-get install -y python3)"
if ! command -v wrk >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
    fi
    command -v wrk >/dev/null || die "wrk is needed (apt-get install -y wrk)"
fi

cargo build --release --bin kmi-proxy
BIN=target/release/kmi-proxy

# shellcheck source=benches/lib.sh
. benches/lib.sh
warn_if_busy
# Room for IDLE_CONNS sockets on both ends (the proxy and the client inherit this limit).
raise_open_files $((IDLE_CONNS * 2 + 256)) IDLE_CONNS

WORK=$(mktemp -d)
DEMO_PID=
PROXY_PID=
cleanup() {
    for pid in $PROXY_PID $DEMO_PID; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in $PROXY_PID $DEMO_PID; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The demo: origin (and an unused proxy) in one process.
RUST_LOG=warn "$BIN" demo --listen 127.0.0.1:0 >"$WORK/demo.out" 2>"$WORK/demo.err" &
DEMO_PID=$!
ORIGIN=
for _ in $(seq 100); do
    ORIGIN=$(sed -n 's/^kmi-proxy demo: origin on http:\/\/\([^,]*\),.*/\1/p' "$WORK/demo.out")
    [ -n "$ORIGIN" ] && break
    kill -0 "$DEMO_PID" 2>/dev/null || die "the demo exited: $(cat "$WORK/demo.err")"
    sleep 0.1
done
[ -n "$ORIGIN" ] || die "the demo did not report its origin address"

# The proxy under test, configured as deploy/ configures it (JSON access log on, admin listener).
PORT=$(free_port)
ADMIN=$(free_port)
cat >"$WORK/config.toml" <<EOF
listen = "127.0.0.1:$PORT"
upstream = "http://$ORIGIN"

[admin]
listen = "127.0.0.1:$ADMIN"

[log]
format = "json"

[[partner]]
name = "checkout"
domains = ["checkout.partner.example", "*.shop.partner.example"]
EOF
"$BIN" check --config "$WORK/config.toml" >/dev/null
"$BIN" --config "$WORK/config.toml" >/dev/null 2>"$WORK/access.log" &
PROXY_PID=$!

python3 - "$PORT" "$ADMIN" "$COOKIE" "$DECORATED" <<'PY' || die "the proxy did not become ready or did not decorate links"
import sys, time, urllib.request
port, admin, cookie, decorated = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
deadline = time.time() + 10
while True:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2).read()
        break
    except Exception:
        if time.time() > deadline:
            raise
        time.sleep(0.1)
req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Cookie": cookie})
body = urllib.request.urlopen(req, timeout=5).read().decode()
n = body.count(decorated)
assert n > 0, "no decorated link in the response"
print(f"sanity: GET / through the proxy -> {len(body)} bytes, {n} partner links decorated")
PY

# Field 14 and 15 of /proc/PID/stat (utime, stime) in clock ticks; split after the ')' of comm.
ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
HZ=$(getconf CLK_TCK)

say ""
say "== memory: $IDLE_CONNS idle keep-alive connections =="
# A fresh process (a few hundred requests of warm-up only), so freed memory from a load run
# cannot be reused for the connections and hide their cost. The client reads each response in
# full and keeps the socket open; the proxy's open_connections gauge confirms they are held.
python3 - "$PROXY_PID" "$PORT" "$ADMIN" "$COOKIE" "$IDLE_CONNS" <<'PY'
import http.client, re, sys, time, urllib.request
pid, port, admin, cookie, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])

def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+)", f.read(), re.M).group(1))

def open_connections():
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    return int(float(re.search(r"^kmi_proxy_open_connections (\S+)", text, re.M).group(1)))

def fetch(conn):
    conn.request("GET", "/", headers={"Cookie": cookie})
    r = conn.getresponse()
    r.read()
    assert r.status == 200, r.status

warm = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
for _ in range(300):
    fetch(warm)
warm.close()
time.sleep(1)
before = rss_kib()
conns = []
for _ in range(n):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    fetch(c)
    conns.append(c)
time.sleep(1)  # well inside timeouts.client_header (30 s), which closes idle HTTP/1.1 connections
after = rss_kib()
held = open_connections()
for c in conns:
    c.close()
per = (after - before) * 1024 / n
print(f"idle RSS (after warm-up):        {before / 1024:.1f} MiB")
print(f"RSS with {n} open connections: {after / 1024:.1f} MiB (open_connections gauge: {held})")
print(f"memory per keep-alive connection: {per / 1024:.1f} KiB ((RSS after - RSS before) / {n})")
if held < n:
    sys.exit(f"only {held} of {n} connections were open when RSS was read")
PY

say ""
say "== CPU: wrk -t$THREADS -c$CONNS -d$DURATION, every response rewritten =="
URL="http://127.0.0.1:$PORT/"
wrk -t"$THREADS" -c"$CONNS" -d"$WARMUP" -H "Cookie: $COOKIE" "$URL" >/dev/null
p0=$(ticks "$PROXY_PID")
o0=$(ticks "$DEMO_PID")
t0=$(date +%s.%N)
wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" -H "Cookie: $COOKIE" "$URL" >"$WORK/wrk.out"
t1=$(date +%s.%N)
p1=$(ticks "$PROXY_PID")
o1=$(ticks "$DEMO_PID")
cat "$WORK/wrk.out"
if grep -q -e 'Non-2xx' -e 'Socket errors' "$WORK/wrk.out"; then
    die "wrk saw errors (above); the figures would be wrong"
fi
requests=$(awk '/requests in/ { print $1 }' "$WORK/wrk.out")
rps=$(awk '/^Requests\/sec:/ { print $2 }' "$WORK/wrk.out")
[ -n "$requests" ] && [ -n "$rps" ] || die "could not read wrk's output"

awk -v p="$((p1 - p0))" -v o="$((o1 - o0))" -v hz="$HZ" -v t0="$t0" -v t1="$t1" \
    -v n="$requests" -v rps="$rps" -v cores="$(nproc)" '
BEGIN {
    wall = t1 - t0; pcpu = p / hz; ocpu = o / hz
    printf "requests/s:                       %.0f (%d requests in %.1f s wall)\n", rps, n, wall
    printf "proxy CPU:                        %.2f CPU-s over the run = %.2f cores busy\n", pcpu, pcpu / wall
    printf "proxy CPU per 1,000 requests/s:   %.3f cores (%.0f us of CPU per request)\n", pcpu / n * 1000, pcpu / n * 1e6
    printf "origin (demo) CPU, not included:  %.2f cores busy\n", ocpu / wall
    printf "\n"
    printf "Note: wrk, the demo origin and the proxy share this machine'"'"'s %d core(s) over loopback, so\n", cores
    printf "the proxy is starved for CPU and pays for cache contention: requests/s is a lower bound\n"
    printf "and CPU per 1,000 requests/s an upper bound for a replica with cores of its own.\n"
}'
say "RSS after the load run:           $(awk '{ printf "%.1f MiB", $1 / 1024 }' <<<"$(rss_kib "$PROXY_PID")") (peak $(awk '{ printf "%.1f MiB", $1 / 1024 }' <<<"$(hwm_kib "$PROXY_PID")"))"
say "machine: $(nproc) core(s), $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || echo unknown CPU)"

say ""
say "== memory per rewritten HTTP/2 stream in flight (cargo bench --bench pressure -- streams) =="
if ! cargo bench --bench pressure -- streams 2>"$WORK/pressure.err" | grep -v '^$'; then
    grep -A5 'FAILED' "$WORK/pressure.err" >&2 || tail -5 "$WORK/pressure.err" >&2
    die "the held-streams bench failed (above)"
fi
