#!/usr/bin/env bash
# Bounded load test: kmi-proxy side by side with a plain nginx proxy_pass, both in front of the
# same nginx origin serving a real page (the cloudflare.com corpus page, ~116 KiB of HTML).
#
#   benches/load.sh                     # from anywhere; 1 to 1.5 min after the build
#   LOAD_SECONDS=30 benches/load.sh     # a longer measured run
#
# Loopback only, bounded in time; everything it starts lives in a temporary directory and is
# stopped on exit by its saved PID (nginx by `nginx -s stop` with its own pid file).
#
#   1. installs what a fresh Debian machine lacks (as root: nginx, wrk, curl, python3) and runs
#      `cargo build --release`;
#   2. one nginx (its own nginx.conf, pid file and error log in the temporary directory; access
#      log off) is the origin, serving the page as text/html; charset=utf-8, and on another port
#      a plain proxy_pass reverse proxy to that origin: the contender;
#   3. kmi-proxy with upstream = the origin and three cloudflare.com partner domains, so every
#      response to a visitor with an identity cookie is rewritten and its partner links decorated;
#   4. a warm-up through kmi-proxy (rounds of WARMUP_SECONDS until its peak RSS settles), then the
#      measured run (`wrk --latency`, CONNS connections, LOAD_SECONDS seconds, cookie km_ai=...),
#      then the same run against nginx proxy_pass;
#   5. checks, any failure exits non-zero: kmi-proxy served no non-2xx response and wrk saw no
#      socket error; one curl shows the page decorated (kmi=<the id> in a partner link); RSS after
#      the measured run is no more than 10% above RSS after the warm-up (no leak); the admin
#      /metrics counted the measured requests as kmi_proxy_responses_total{reason="rewritten"}.
#
# Environment: LOAD_SECONDS (15), WARMUP_SECONDS (5, per round), WARMUP_ROUNDS_MAX (8),
# CONNS (256), THREADS (2), KMI_CORPUS (directory holding cloudflare.com.html; default
# ../shared/corpus from the repository root), KEEP_WORK=1 keeps the temporary directory (configs,
# logs, wrk output) for inspection.
set -euo pipefail
cd "$(dirname "$0")/.."

LOAD_SECONDS=${LOAD_SECONDS:-15}
WARMUP_SECONDS=${WARMUP_SECONDS:-5}
WARMUP_ROUNDS_MAX=${WARMUP_ROUNDS_MAX:-8}
WARMUP_SETTLE_PCT=2
CONNS=${CONNS:-256}
THREADS=${THREADS:-2}
CORPUS_DIR=${KMI_CORPUS:-../shared/corpus}
PAGE="$CORPUS_DIR/cloudflare.com.html"
ID='Zk9%2BaB%2Fc3Q%3D%3D'
COOKIE="km_ai=$ID"
DECORATED="kmi=$ID"
RSS_GROWTH_MAX_PCT=10

say() { printf '%s\n' "$*"; }
die() {
    printf 'load.sh: %s\n' "$*" >&2
    exit 1
}

for v in LOAD_SECONDS WARMUP_SECONDS WARMUP_ROUNDS_MAX CONNS THREADS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive whole number, not '${!v}'"
done
[ -r "$PAGE" ] || die "corpus page $PAGE not found (set KMI_CORPUS to the directory holding it)"

# ---------------------------------------------------------------------------------------------
# 1. Tools and the build.
find_nginx() { command -v nginx 2>/dev/null || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true; }
missing=()
[ -n "$(find_nginx)" ] || missing+=(nginx)
command -v wrk >/dev/null || missing+=(wrk)
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing ${missing[*]} (apt-get)"
        # Debian's nginx package may start a system nginx on port 80; this script never uses it.
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y "${missing[@]}" >/dev/null 2>&1 ||
            { apt-get update >/dev/null && apt-get install -y "${missing[@]}" >/dev/null; } ||
            die "apt-get install -y ${missing[*]} failed"
    else
        die "missing ${missing[*]}: as root, apt-get install -y ${missing[*]}"
    fi
fi
NGINX=$(find_nginx)
[ -n "$NGINX" ] || die "nginx is still not found after installing it"

cargo build --release --bin kmi-proxy
BIN=$PWD/target/release/kmi-proxy

# Other busy processes (a compiler, say) take CPU from all three contenders and skew the figures.
cpu_sample() { awk '/^cpu / { print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $5 + $6 }' /proc/stat; }
read -r total0 idle0 < <(cpu_sample)
sleep 1
read -r total1 idle1 < <(cpu_sample)
busy=$(awk -v t="$((total1 - total0))" -v i="$((idle1 - idle0))" 'BEGIN { printf "%.0f", t ? 100 * (t - i) / t : 0 }')
if [ "$busy" -gt 10 ]; then
    printf 'warning: the machine was %s%% busy before the run; other processes compete for the CPU\n' "$busy" >&2
fi

# Room for every socket: wrk's, the proxies' both sides, the origin's.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
need=$((CONNS * 4 + 256))
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge "$need" ] ||
    die "open-file limit $(ulimit -n) is below $need; raise it or lower CONNS"

# ---------------------------------------------------------------------------------------------
# Cleanup: only what this script started, by saved PID / own pid file.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kmi-load.XXXXXX")
PROXY_PID=
NGINX_PID=
NGINX_STARTED=
nginx_ctl() { "$NGINX" -c "$WORK/nginx.conf" -p "$WORK/" -e "$WORK/nginx-error.log" "$@"; }
cleanup() {
    local status=$?
    trap - EXIT
    set +e
    if [ -n "$PROXY_PID" ]; then
        kill "$PROXY_PID" 2>/dev/null || true
        wait "$PROXY_PID" 2>/dev/null || true
    fi
    if [ -n "$NGINX_STARTED" ]; then
        [ -z "$NGINX_PID" ] && [ -s "$WORK/nginx.pid" ] && NGINX_PID=$(cat "$WORK/nginx.pid")
        nginx_ctl -s stop 2>/dev/null || true
        if [ -n "$NGINX_PID" ]; then
            for _ in $(seq 50); do
                kill -0 "$NGINX_PID" 2>/dev/null || break
                sleep 0.1
            done
            # Still there after 5 s: the saved master PID, never a name.
            if kill -0 "$NGINX_PID" 2>/dev/null; then
                kill "$NGINX_PID" 2>/dev/null
            fi
        fi
    fi
    if [ "$status" -ne 0 ] && [ -d "$WORK" ]; then
        for f in proxy.log nginx-error.log; do
            [ -s "$WORK/$f" ] || continue
            printf '\n--- last lines of %s ---\n' "$f" >&2
            tail -n 20 "$WORK/$f" >&2
        done
    fi
    if [ "${KEEP_WORK:-0}" = 1 ]; then
        printf 'kept %s\n' "$WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Ports the kernel just handed out and released: free on loopback.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}
read -r ORIGIN_PORT NGINX_PROXY_PORT PROXY_PORT ADMIN_PORT < <(free_ports 4)

wait_http() { # URL, what, PID to watch (optional)
    for _ in $(seq 100); do
        curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null && return 0
        if [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null; then
            die "$2 exited before it answered on $1"
        fi
        sleep 0.1
    done
    die "$2 did not answer on $1 within 10 s"
}

# ---------------------------------------------------------------------------------------------
# 2. nginx: the origin and the proxy_pass contender, one master with its own files.
mkdir -p "$WORK/www"
cp "$PAGE" "$WORK/www/index.html"
# As root, nginx's workers would run as nobody, who cannot enter mktemp's private (0700)
# directory; as another user they run as that user anyway.
user_line=
[ "$(id -u)" = 0 ] && user_line="user root;"
cat >"$WORK/nginx.conf" <<EOF
$user_line
worker_processes auto;
worker_rlimit_nofile 16384;
daemon on;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;

events {
    worker_connections 8192;
}

http {
    access_log off;
    types { text/html html; }
    default_type text/html;
    charset utf-8;
    sendfile on;
    tcp_nodelay on;
    # Neither wrk's connections nor the proxies' pooled ones to the origin are recycled mid-run.
    keepalive_timeout 65s;
    keepalive_requests 10000000;
    client_body_temp_path $WORK/tmp/client_body;
    proxy_temp_path $WORK/tmp/proxy;
    fastcgi_temp_path $WORK/tmp/fastcgi;
    uwsgi_temp_path $WORK/tmp/uwsgi;
    scgi_temp_path $WORK/tmp/scgi;

    # The origin: the corpus page at every path.
    server {
        listen 127.0.0.1:$ORIGIN_PORT;
        root $WORK/www;
        location / {
            try_files /index.html =404;
        }
    }

    # The contender: a plain reverse proxy to the same origin, with a keep-alive pool as
    # kmi-proxy has.
    upstream origin {
        server 127.0.0.1:$ORIGIN_PORT;
        keepalive $CONNS;
        keepalive_requests 10000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PROXY_PORT;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
        }
    }
}
EOF
mkdir -p "$WORK/tmp"
nginx_ctl -t -q || die "nginx rejected $WORK/nginx.conf"
NGINX_STARTED=1
nginx_ctl
for _ in $(seq 50); do
    [ -s "$WORK/nginx.pid" ] && break
    sleep 0.1
done
[ -s "$WORK/nginx.pid" ] || die "nginx wrote no pid file"
NGINX_PID=$(cat "$WORK/nginx.pid")
wait_http "http://127.0.0.1:$ORIGIN_PORT/" "the nginx origin" "$NGINX_PID"
wait_http "http://127.0.0.1:$NGINX_PROXY_PORT/" "the nginx proxy" "$NGINX_PID"
ctype=$(curl -fsS -o /dev/null -w '%{content_type}' "http://127.0.0.1:$ORIGIN_PORT/")
[ "$ctype" = "text/html; charset=utf-8" ] || die "the origin serves Content-Type '$ctype'"

# ---------------------------------------------------------------------------------------------
# 3. kmi-proxy, configured for the page's partner links.
cat >"$WORK/kmi-proxy.toml" <<EOF
listen = "127.0.0.1:$PROXY_PORT"
upstream = "http://127.0.0.1:$ORIGIN_PORT"
shutdown_timeout = "2s"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[log]
format = "text"

[limits]
max_connections = 10000

[[partner]]
name = "cloudflare"
domains = ["dash.cloudflare.com", "support.cloudflare.com", "community.cloudflare.com"]
EOF
"$BIN" check --config "$WORK/kmi-proxy.toml" >/dev/null 2>"$WORK/check.err" ||
    die "kmi-proxy check rejected the config: $(cat "$WORK/check.err")"
# One access-log line per request: to a file, never to a terminal.
"$BIN" --config "$WORK/kmi-proxy.toml" >/dev/null 2>"$WORK/proxy.log" &
PROXY_PID=$!
wait_http "http://127.0.0.1:$ADMIN_PORT/readyz" "kmi-proxy" "$PROXY_PID"

PROXY_URL="http://127.0.0.1:$PROXY_PORT/"
NGINX_URL="http://127.0.0.1:$NGINX_PROXY_PORT/"

# ---------------------------------------------------------------------------------------------
# Helpers over /proc and wrk's output.
proc_status() { # PID, field
    [ -r "/proc/$1/status" ] || die "kmi-proxy (PID $1) is gone; see its log above"
    awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}
rss_kib() { proc_status "$1" VmRSS; }
hwm_kib() { proc_status "$1" VmHWM; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }
rewritten_total() {
    curl -fsS --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" |
        awk '$1 == "kmi_proxy_responses_total{reason=\"rewritten\"}" { v = $2 } END { printf "%d\n", v + 0 }'
}
# The number after "Non-2xx or 3xx responses:"; wrk prints that line only when there were some.
wrk_non2xx() { awk -F': *' '/Non-2xx or 3xx responses/ { n += $2 } END { print n + 0 }' "$1"; }
# "Socket errors: connect 0, read 0, write 0, timeout 0", likewise only when there were some.
wrk_sockerr() {
    awk '/Socket errors:/ { gsub(/,/, ""); for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+$/) n += $i } END { print n + 0 }' "$1"
}
wrk_requests() { awk '/ requests in / { print $1 }' "$1"; }
wrk_rps() { awk '/^Requests\/sec:/ { print $2 }' "$1"; }
wrk_pct() { awk -v p="$2%" '$1 == p { print $2 }' "$1"; }
# wrk's latency (e.g. 812.00us, 12.34ms, 1.02s) in milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        if (match(v, /^[0-9.]+/)) { n = substr(v, 1, RLENGTH); u = substr(v, RLENGTH + 1) } else { print "?"; exit }
        f = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "m") ? 60000 : (u == "h") ? 3600000 : -1
        if (f < 0) print "?"; else printf "%.2f\n", n * f
    }'
}
run_wrk() { # label, seconds, URL, output file
    say ""
    say "== $1: wrk -t$THREADS -c$CONNS -d${2}s --latency -H 'Cookie: $COOKIE' $3 =="
    wrk -t"$THREADS" -c"$CONNS" -d"${2}s" --latency -H "Cookie: $COOKIE" "$3" >"$4" ||
        die "wrk failed against $3: $(cat "$4")"
    cat "$4"
}

# ---------------------------------------------------------------------------------------------
# 4. Decoration check, warm-up, measured runs.
CHECKS=()
FAILED=()
check() { # description, 0 = pass
    if [ "$2" = 0 ]; then
        CHECKS+=("PASS  $1")
    else
        CHECKS+=("FAIL  $1")
        FAILED+=("$1")
    fi
}

kmi_bytes=$(curl -fsS --max-time 10 -o "$WORK/decorated.html" -w '%{size_download}' -H "Cookie: $COOKIE" "$PROXY_URL")
origin_bytes=$(wc -c <"$WORK/www/index.html")
decorated=$(grep -o -F "$DECORATED" "$WORK/decorated.html" | wc -l)
say "sanity: GET / through kmi-proxy -> $kmi_bytes bytes (origin page $origin_bytes bytes), $decorated partner links carry $DECORATED"
check "curl through kmi-proxy: the page is decorated ($decorated x $DECORATED)" "$([ "$decorated" -gt 0 ] && echo 0 || echo 1)"
nginx_bytes=$(curl -fsS --max-time 10 -o /dev/null -w '%{size_download}' -H "Cookie: $COOKIE" "$NGINX_URL")
say "sanity: GET / through nginx proxy_pass -> $nginx_bytes bytes"
[ "$nginx_bytes" = "$origin_bytes" ] || die "nginx proxy_pass returned $nginx_bytes bytes, the origin page has $origin_bytes"

# Warm-up: rounds of WARMUP_SECONDS until the peak RSS (VmHWM) grew by less than
# WARMUP_SETTLE_PCT over a round, at most WARMUP_ROUNDS_MAX rounds. The allocator's arenas grow
# to the footprint of the busiest moment of 256 connections: one short round falls short of it,
# and a measured run that merely reaches it would pass for a leak.
say ""
say "== warm-up through kmi-proxy: rounds of wrk -t$THREADS -c$CONNS -d${WARMUP_SECONDS}s until peak RSS settles =="
hwm_prev=$(hwm_kib "$PROXY_PID")
round=0
while :; do
    round=$((round + 1))
    wrk -t"$THREADS" -c"$CONNS" -d"${WARMUP_SECONDS}s" -H "Cookie: $COOKIE" "$PROXY_URL" >"$WORK/wrk-warmup.out" ||
        die "wrk failed against $PROXY_URL: $(cat "$WORK/wrk-warmup.out")"
    sleep 1
    rss_warm=$(rss_kib "$PROXY_PID")
    hwm_now=$(hwm_kib "$PROXY_PID")
    grew=$(awk -v a="$hwm_now" -v b="$hwm_prev" 'BEGIN { printf "%.1f", 100 * (a - b) / b }')
    say "round $round: $(wrk_requests "$WORK/wrk-warmup.out") requests, $(wrk_non2xx "$WORK/wrk-warmup.out") non-2xx, RSS $(mib "$rss_warm"), peak $(mib "$hwm_now") (+${grew}%)"
    settled=$(awk -v g="$grew" -v m="$WARMUP_SETTLE_PCT" 'BEGIN { print ((g < m) ? 1 : 0) }')
    if [ "$round" -ge 2 ] && [ "$settled" = 1 ]; then
        break
    fi
    if [ "$round" -ge "$WARMUP_ROUNDS_MAX" ]; then
        say "warning: peak RSS still grew by ${grew}% in warm-up round $round (the last); the leak check may be pessimistic" >&2
        break
    fi
    hwm_prev=$hwm_now
done
say "kmi-proxy RSS after warm-up ($round rounds): $(mib "$rss_warm")"

rewritten_before=$(rewritten_total)
run_wrk "kmi-proxy (measured)" "$LOAD_SECONDS" "$PROXY_URL" "$WORK/wrk-kmi.out"
sleep 1 # responses cut off when wrk stopped finish their accounting
rss_after=$(rss_kib "$PROXY_PID")
hwm=$(hwm_kib "$PROXY_PID")
rewritten_after=$(rewritten_total)
say "kmi-proxy RSS after the measured run: $(mib "$rss_after") (peak VmHWM $(mib "$hwm"))"

run_wrk "nginx proxy_pass (measured)" "$LOAD_SECONDS" "$NGINX_URL" "$WORK/wrk-nginx.out"

# ---------------------------------------------------------------------------------------------
# 5. Checks.
kmi_req=$(wrk_requests "$WORK/wrk-kmi.out")
kmi_rps=$(wrk_rps "$WORK/wrk-kmi.out")
ngx_req=$(wrk_requests "$WORK/wrk-nginx.out")
ngx_rps=$(wrk_rps "$WORK/wrk-nginx.out")
[ -n "$kmi_req" ] && [ -n "$kmi_rps" ] && [ -n "$ngx_req" ] && [ -n "$ngx_rps" ] ||
    die "could not read wrk's output"

n=$(wrk_non2xx "$WORK/wrk-kmi.out")
check "kmi-proxy: non-2xx responses = $n (want 0)" "$([ "$n" = 0 ] && echo 0 || echo 1)"
n=$(wrk_sockerr "$WORK/wrk-kmi.out")
check "kmi-proxy: socket errors = $n (want 0)" "$([ "$n" = 0 ] && echo 0 || echo 1)"
[ "$kmi_req" -gt 0 ] || check "kmi-proxy: wrk completed requests" 1

growth_ok=$(awk -v a="$rss_after" -v w="$rss_warm" -v m="$RSS_GROWTH_MAX_PCT" 'BEGIN { print ((a <= w * (1 + m / 100)) ? 0 : 1) }')
growth_pct=$(awk -v a="$rss_after" -v w="$rss_warm" 'BEGIN { printf "%+.1f", 100 * (a - w) / w }')
check "kmi-proxy: RSS after run within ${RSS_GROWTH_MAX_PCT}% of RSS after warm-up ($(mib "$rss_warm") -> $(mib "$rss_after"), ${growth_pct}%)" "$growth_ok"

# Every request wrk completed was rewritten; wrk also abandons at most one in-flight request per
# connection when its time is up, which the proxy may have answered (and counted) all the same.
delta=$((rewritten_after - rewritten_before))
check "admin /metrics: responses_total{reason=\"rewritten\"} grew by $delta for $kmi_req wrk requests (want $kmi_req..$((kmi_req + CONNS)))" \
    "$([ "$delta" -ge "$kmi_req" ] && [ "$delta" -le $((kmi_req + CONNS)) ] && echo 0 || echo 1)"

ngx_bad=$(($(wrk_non2xx "$WORK/wrk-nginx.out") + $(wrk_sockerr "$WORK/wrk-nginx.out")))
if [ "$ngx_bad" -gt 0 ]; then
    say "warning: nginx proxy_pass had $ngx_bad non-2xx responses or socket errors; its figures and the ratio are suspect" >&2
fi

# ---------------------------------------------------------------------------------------------
# 6. Summary.
kmi_p50=$(wrk_pct "$WORK/wrk-kmi.out" 50)
kmi_p99=$(wrk_pct "$WORK/wrk-kmi.out" 99)
ngx_p50=$(wrk_pct "$WORK/wrk-nginx.out" 50)
ngx_p99=$(wrk_pct "$WORK/wrk-nginx.out" 99)
ratio=$(awk -v a="$kmi_rps" -v b="$ngx_rps" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
say ""
say "== summary: $CONNS connections, ${LOAD_SECONDS} s each, page $origin_bytes bytes, every kmi-proxy response rewritten =="
printf '%-20s %12s %12s %12s %12s\n' "contender" "requests" "requests/s" "p50 ms" "p99 ms"
printf '%-20s %12s %12.0f %12s %12s\n' "kmi-proxy" "$kmi_req" "$kmi_rps" "$(to_ms "$kmi_p50")" "$(to_ms "$kmi_p99")"
printf '%-20s %12s %12.0f %12s %12s\n' "nginx proxy_pass" "$ngx_req" "$ngx_rps" "$(to_ms "$ngx_p50")" "$(to_ms "$ngx_p99")"
say "requests/s ratio kmi-proxy / nginx proxy_pass: $ratio"
say "kmi-proxy RSS: after warm-up $(mib "$rss_warm"), after the measured run $(mib "$rss_after") (${growth_pct}%), peak (VmHWM) $(mib "$hwm")"
say "Note: wrk, nginx (origin and proxy, worker_processes auto) and kmi-proxy all share this machine's"
say "$(nproc) core(s) over loopback ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || echo unknown CPU));"
say "the figures compare the two proxies under the same handicap, not what either does on cores of its own."
say "During the kmi-proxy run the origin also does work; during the nginx run the same nginx workers serve"
say "both the proxy and the origin."
say ""
say "== checks =="
printf '%s\n' "${CHECKS[@]}"
if [ "${#FAILED[@]}" -gt 0 ]; then
    die "${#FAILED[@]} check(s) failed"
fi
say "all checks passed"
