#!/usr/bin/env bash
# Side by side under load: kmi-proxy against nginx, on one machine, in one run. An nginx origin
# serves a real page (the cloudflare.com corpus page, ~116 KiB of HTML) and a 100 MiB binary
# file; in front of it, three contenders:
#
#   proxy_pass   nginx `proxy_pass` (the pass-through ceiling: no parsing, no rewriting);
#   sub_filter   nginx `proxy_pass` + `sub_filter` replacing the three partner hosts'
#                `href="https://host/` prefixes with one carrying `?kmi=$cookie_km_ai` (the peer a
#                user would pick instead: plain string replacement, wrong for every link with a
#                path, but what nginx offers);
#   kmi-proxy    the release binary, upstream = the origin, partners = those three hosts
#                (the page is recorded once and spliced for every later visitor);
#   kmi-no-id    the same kmi-proxy, requests without the cookie (pass-through: the ceiling
#                splicing is measured against);
#   kmi-changing the same kmi-proxy on a page whose head carries a per-request token (nginx SSI
#                echoing $request_id), so no two responses are the same bytes;
#   kmi-changing-nosplice  a second kmi-proxy with `cache_bytes = 0` on that page: what the
#                changing page costs with splicing off.
#
#   benches/load.sh                           # ~4 min after the build (ROUNDS=3, LOAD_SECONDS=10)
#   ROUNDS=5 LOAD_SECONDS=10 benches/load.sh  # the README's figures
#
# Loopback only, bounded in time; everything it starts lives in a temporary directory and is
# stopped on exit by its saved PID (nginx by `nginx -s stop` with its own pid file).
#
#   1. installs what a fresh Debian machine lacks (as root: nginx, wrk, curl, python3) and runs
#      `cargo build --release`;
#   2. one nginx (its own nginx.conf, pid file and error log in the temporary directory; access
#      log off) is the origin and, on two more ports, the proxy_pass and sub_filter contenders;
#   3. kmi-proxy, configured as deployed (admin listener, access log to a file); its RSS before
#      any request is the idle RSS;
#   4. sanity: each contender returns the page (kmi-proxy and sub_filter with the ID in partner
#      links, proxy_pass byte for byte); then a warm-up through kmi-proxy (rounds of
#      WARMUP_SECONDS until its peak RSS settles);
#   5. ROUNDS rounds; in each, for every connection count in CONNS_LIST, every contender gets
#      `wrk --latency -cN -dLOAD_SECONDS` with a km_ai cookie, in an order that rotates from round
#      to round (no contender always runs first on a cool machine or last on a hot one);
#   6. the 100 MiB file through proxy_pass and kmi-proxy with curl, BINARY_ROUNDS times each,
#      alternating;
#   7. medians over the rounds, the ratios and the performance issue's targets, printed as met or
#      NOT met (measurements on a shared machine: reported, not asserted); then the checks, where
#      any failure exits non-zero: kmi-proxy served no non-2xx response and wrk saw no socket
#      error; the binary arrived whole; RSS after the measured runs is no more than 10% above RSS
#      after the warm-up (no leak); the admin /metrics counted the measured requests as rewritten.
#
# Environment: ROUNDS (3), LOAD_SECONDS (10), CONNS_LIST ("32 256"), BINARY_ROUNDS (3),
# WARMUP_SECONDS (5, per round), WARMUP_ROUNDS_MAX (8), THREADS (2), KMI_CORPUS (directory
# holding cloudflare.com.html; default ../shared/corpus from the repository root), KEEP_WORK=1
# keeps the temporary directory (configs, logs, wrk output) for inspection.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
LOAD_SECONDS=${LOAD_SECONDS:-10}
CONNS_LIST=${CONNS_LIST:-32 256}
BINARY_ROUNDS=${BINARY_ROUNDS:-3}
BINARY_MIB=100
WARMUP_SECONDS=${WARMUP_SECONDS:-5}
WARMUP_ROUNDS_MAX=${WARMUP_ROUNDS_MAX:-8}
WARMUP_SETTLE_PCT=2
THREADS=${THREADS:-2}
CORPUS_DIR=${KMI_CORPUS:-../shared/corpus}
PAGE="$CORPUS_DIR/cloudflare.com.html"
ID='Zk9%2BaB%2Fc3Q%3D%3D'
COOKIE="km_ai=$ID"
DECORATED="kmi=$ID"
RSS_GROWTH_MAX_PCT=10
PARTNERS=(dash.cloudflare.com support.cloudflare.com community.cloudflare.com)
CONTENDERS=(proxy_pass sub_filter kmi-proxy kmi-no-id kmi-changing kmi-changing-nosplice)

say() { printf '%s\n' "$*"; }
die() {
    printf 'load.sh: %s\n' "$*" >&2
    exit 1
}

for v in ROUNDS LOAD_SECONDS BINARY_ROUNDS WARMUP_SECONDS WARMUP_ROUNDS_MAX THREADS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive whole number, not '${!v}'"
done
CONNS_MAX=0
for c in $CONNS_LIST; do
    [[ $c =~ ^[1-9][0-9]*$ ]] || die "CONNS_LIST must hold positive whole numbers, not '$c'"
    [ "$c" -ge "$THREADS" ] || die "every connection count must be at least THREADS ($THREADS), not $c"
    [ "$c" -gt "$CONNS_MAX" ] && CONNS_MAX=$c
done
[ "$CONNS_MAX" -gt 0 ] || die "CONNS_LIST is empty"
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

# shellcheck source=benches/lib.sh
. benches/lib.sh
warn_if_busy
# Room for every socket: wrk's, the proxies' both sides, the origin's.
raise_open_files $((CONNS_MAX * 4 + 256)) CONNS_LIST

# ---------------------------------------------------------------------------------------------
# Cleanup: only what this script started, by saved PID / own pid file.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kmi-load.XXXXXX")
PROXY_PID=
NOSPLICE_PID=
NGINX_PID=
NGINX_STARTED=
nginx_ctl() { "$NGINX" -c "$WORK/nginx.conf" -p "$WORK/" -e "$WORK/nginx-error.log" "$@"; }
cleanup() {
    local status=$?
    trap - EXIT
    set +e
    for pid in $PROXY_PID $NOSPLICE_PID; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
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
read -r ORIGIN_PORT NGINX_PROXY_PORT NGINX_SUB_PORT PROXY_PORT ADMIN_PORT NOSPLICE_PORT NOSPLICE_ADMIN_PORT < <(free_ports 7)

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
# ---------------------------------------------------------------------------------------------
# 2. nginx: the origin and the two nginx contenders, one master with its own files.
mkdir -p "$WORK/www" "$WORK/tmp"
cp "$PAGE" "$WORK/www/index.html"
# The changing page: the same page with a per-request token in its head, as a CSRF token or a
# CSP nonce would be.
sed '0,/<head>/s//<head><meta name="csrf-token" content="<!--# echo var="request_id" -->">/' "$PAGE" >"$WORK/www/changing.html"
grep -q 'echo var="request_id"' "$WORK/www/changing.html" || die "no <head> in $PAGE to put a token in"
head -c "$((BINARY_MIB * 1024 * 1024))" /dev/urandom >"$WORK/www/big.bin"
# sub_filter: every `href="https://<partner>/` gains the cookie's value, as an operator would
# write it. (nginx reads $cookie_km_ai as the raw, still URL-encoded cookie value.)
sub_filters=
for p in "${PARTNERS[@]}"; do
    sub_filters+="            sub_filter 'href=\"https://$p/' 'href=\"https://$p/?kmi=\$cookie_km_ai&amp;';"$'\n'
done
# As root, nginx's workers would run as nobody, who cannot enter mktemp's private (0700)
# directory; as another user they run as that user anyway.
user_line=
[ "$(id -u)" = 0 ] && user_line="user root;"
cat >"$WORK/nginx.conf" <<NGINX
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
    types { text/html html; application/octet-stream bin; }
    default_type text/html;
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

    # The origin: the corpus page at every path, and /big.bin.
    server {
        listen 127.0.0.1:$ORIGIN_PORT;
        root $WORK/www;
        location / {
            charset utf-8;
            try_files /index.html =404;
        }
        location = /big.bin {
        }
        location = /changing {
            ssi on;
            charset utf-8;
            try_files /changing.html =404;
        }
    }

    # Both nginx contenders keep a pool of connections to the origin, as kmi-proxy does.
    upstream origin {
        server 127.0.0.1:$ORIGIN_PORT;
        keepalive $CONNS_MAX;
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
    server {
        listen 127.0.0.1:$NGINX_SUB_PORT;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            # sub_filter cannot read a compressed body.
            proxy_set_header Accept-Encoding "";
            sub_filter_once off;
$sub_filters
        }
    }
}
NGINX
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
wait_http "http://127.0.0.1:$NGINX_SUB_PORT/" "the nginx sub_filter proxy" "$NGINX_PID"
ctype=$(curl -fsS -o /dev/null -w '%{content_type}' "http://127.0.0.1:$ORIGIN_PORT/")
[ "$ctype" = "text/html; charset=utf-8" ] || die "the origin serves Content-Type '$ctype'"

# ---------------------------------------------------------------------------------------------
# 3. kmi-proxy, configured for the page's partner links.
partner_list=$(printf '"%s", ' "${PARTNERS[@]}")
cat >"$WORK/kmi-proxy.toml" <<TOML
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
domains = [${partner_list%, }]
TOML
"$BIN" check --config "$WORK/kmi-proxy.toml" >/dev/null 2>"$WORK/check.err" ||
    die "kmi-proxy check rejected the config: $(cat "$WORK/check.err")"
# One access-log line per request: to a file, never to a terminal.
"$BIN" --config "$WORK/kmi-proxy.toml" >/dev/null 2>"$WORK/proxy.log" &
PROXY_PID=$!
wait_http "http://127.0.0.1:$ADMIN_PORT/readyz" "kmi-proxy" "$PROXY_PID"
# The same proxy with splicing off, for the changing page.
sed -e "s/127.0.0.1:$PROXY_PORT/127.0.0.1:$NOSPLICE_PORT/" -e "s/127.0.0.1:$ADMIN_PORT/127.0.0.1:$NOSPLICE_ADMIN_PORT/" \
    -e 's/^\[log\]$/[rewrite]\ncache_bytes = 0\n\n[log]/' "$WORK/kmi-proxy.toml" >"$WORK/kmi-nosplice.toml"
grep -q '^cache_bytes = 0$' "$WORK/kmi-nosplice.toml" || die "could not write $WORK/kmi-nosplice.toml"
"$BIN" --config "$WORK/kmi-nosplice.toml" >/dev/null 2>"$WORK/nosplice.log" &
NOSPLICE_PID=$!
wait_http "http://127.0.0.1:$NOSPLICE_ADMIN_PORT/readyz" "kmi-proxy (splicing off)" "$NOSPLICE_PID"

url_of() { # contender
    case $1 in
        proxy_pass) echo "http://127.0.0.1:$NGINX_PROXY_PORT/" ;;
        sub_filter) echo "http://127.0.0.1:$NGINX_SUB_PORT/" ;;
        kmi-proxy | kmi-no-id) echo "http://127.0.0.1:$PROXY_PORT/" ;;
        kmi-changing) echo "http://127.0.0.1:$PROXY_PORT/changing" ;;
        kmi-changing-nosplice) echo "http://127.0.0.1:$NOSPLICE_PORT/changing" ;;
    esac
}
# The visitor's cookie, for every contender but the one measured without it.
cookie_args_of() { # contender
    [ "$1" = kmi-no-id ] || printf '%s\n' -H "Cookie: $COOKIE"
}
# Contenders whose responses the main kmi-proxy rewrites (and counts as rewritten).
rewrites_on_main() { [ "$1" = kmi-proxy ] || [ "$1" = kmi-changing ]; }

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
pages_total() { # path: parsed, recorded, spliced, diverged
    curl -fsS --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" |
        awk -v s="kmi_proxy_pages_total{reason=\"$1\"}" '$1 == s { v = $2 } END { printf "%d\n", v + 0 }'
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
        if (f < 0) print "?"; else printf "%.3f\n", n * f
    }'
}
median() {
    sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) print "?"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2
    }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "?" || b == "?" || b == 0) print "?"; else printf "%.2f\n", a / b }'; }
# "met" or "NOT met" for: value, ge|le, bound.
verdict() {
    awk -v v="$1" -v op="$2" -v b="$3" 'BEGIN {
        if (v == "?") { print "unknown"; exit }
        ok = (op == "ge") ? (v + 0 >= b + 0) : (v + 0 <= b + 0); print ok ? "met" : "NOT met"
    }'
}

IDLE_RSS=$(rss_kib "$PROXY_PID")

# ---------------------------------------------------------------------------------------------
# 4. Sanity, then the warm-up.
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

origin_bytes=$(wc -c <"$WORK/www/index.html")
for c in "${CONTENDERS[@]}"; do
    mapfile -t cookie < <(cookie_args_of "$c")
    bytes=$(curl -fsS --max-time 10 -o "$WORK/page-$c.html" -w '%{size_download}' "${cookie[@]}" "$(url_of "$c")")
    n=$({ grep -o -F "$DECORATED" "$WORK/page-$c.html" || true; } | wc -l)
    say "sanity: GET $(url_of "$c") as $c -> $bytes bytes (origin page $origin_bytes bytes), $n links carry $DECORATED"
    case $c in
        proxy_pass) cmp -s "$WORK/page-$c.html" "$WORK/www/index.html" || die "nginx proxy_pass changed the page" ;;
        sub_filter) [ "$n" -gt 0 ] || die "nginx sub_filter substituted nothing; see $WORK/nginx.conf" ;;
        kmi-no-id) check "curl through kmi-proxy without the cookie: the page is the origin's" "$(cmp -s "$WORK/page-$c.html" "$WORK/www/index.html" && echo 0 || echo 1)" ;;
        *) check "curl as $c: the page is decorated ($n x $DECORATED)" "$([ "$n" -gt 0 ] && echo 0 || echo 1)" ;;
    esac
done
# Spliced pages are the parsed page: the second request through kmi-proxy (spliced from the
# first's recording) must be byte for byte the page kmi-proxy with splicing off sends.
curl -fsS --max-time 10 -o "$WORK/page-spliced.html" -H "Cookie: $COOKIE" "$(url_of kmi-proxy)"
curl -fsS --max-time 10 -o "$WORK/page-parsed.html" -H "Cookie: $COOKIE" "http://127.0.0.1:$NOSPLICE_PORT/"
check "kmi-proxy: the spliced page equals the parsed one byte for byte" "$(cmp -s "$WORK/page-spliced.html" "$WORK/page-parsed.html" && echo 0 || echo 1)"
n=$(pages_total spliced)
check "kmi-proxy: /metrics counted the second request as spliced (pages_total{reason=\"spliced\"} = $n)" "$([ "$n" -ge 1 ] && echo 0 || echo 1)"

# Warm-up: rounds of WARMUP_SECONDS at the largest connection count until the peak RSS (VmHWM)
# grew by less than WARMUP_SETTLE_PCT over a round, at most WARMUP_ROUNDS_MAX rounds. The
# allocator's arenas grow to the footprint of the busiest moment: one short round falls short of
# it, and a measured run that merely reaches it would pass for a leak.
PROXY_URL=$(url_of kmi-proxy)
say ""
say "== warm-up through kmi-proxy: rounds of wrk -t$THREADS -c$CONNS_MAX -d${WARMUP_SECONDS}s on each of its paths until peak RSS settles =="
hwm_prev=$(hwm_kib "$PROXY_PID")
round=0
while :; do
    round=$((round + 1))
    # Every path the measured runs take through this proxy: spliced, parsed (the changing page)
    # and passed through (no cookie); each settles its own share of the allocator's footprint.
    for c in kmi-changing kmi-no-id kmi-proxy; do
        mapfile -t cookie < <(cookie_args_of "$c")
        wrk -t"$THREADS" -c"$CONNS_MAX" -d"${WARMUP_SECONDS}s" "${cookie[@]}" "$(url_of "$c")" >"$WORK/wrk-warmup.out" ||
            die "wrk failed against $(url_of "$c"): $(cat "$WORK/wrk-warmup.out")"
    done
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

# ---------------------------------------------------------------------------------------------
# 5. Measured rounds: every contender at every connection count, in a rotating order.
say ""
say "== $ROUNDS rounds: wrk -t$THREADS -c<conns> -d${LOAD_SECONDS}s --latency -H 'Cookie: $COOKIE' per contender =="
kmi_requests=0
kmi_runs=0
kmi_slack=0
rewritten_before=$(rewritten_total)
n_contenders=${#CONTENDERS[@]}
for r in $(seq "$ROUNDS"); do
    for conns in $CONNS_LIST; do
        order=()
        for i in $(seq 0 $((n_contenders - 1))); do
            order+=("${CONTENDERS[$(((i + r) % n_contenders))]}")
        done
        for c in "${order[@]}"; do
            out="$WORK/wrk-$c-c$conns-r$r.out"
            mapfile -t cookie < <(cookie_args_of "$c")
            wrk -t"$THREADS" -c"$conns" -d"${LOAD_SECONDS}s" --latency "${cookie[@]}" "$(url_of "$c")" >"$out" ||
                die "wrk failed against $c: $(cat "$out")"
            printf 'round %d, %4d connections, %-21s %9.0f req/s  p50 %9s ms  p99 %9s ms\n' "$r" "$conns" "$c" \
                "$(wrk_rps "$out")" "$(to_ms "$(wrk_pct "$out" 50)")" "$(to_ms "$(wrk_pct "$out" 99)")"
            if [[ $c == kmi-* ]]; then
                n=$(wrk_non2xx "$out")
                check "$c, round $r, $conns connections: non-2xx responses = $n (want 0)" "$([ "$n" = 0 ] && echo 0 || echo 1)"
                n=$(wrk_sockerr "$out")
                check "$c, round $r, $conns connections: socket errors = $n (want 0)" "$([ "$n" = 0 ] && echo 0 || echo 1)"
            fi
            if rewrites_on_main "$c"; then
                kmi_requests=$((kmi_requests + $(wrk_requests "$out")))
                kmi_runs=$((kmi_runs + 1))
                kmi_slack=$((kmi_slack + conns))
            elif [[ $c != kmi-* ]]; then
                bad=$(($(wrk_non2xx "$out") + $(wrk_sockerr "$out")))
                if [ "$bad" -gt 0 ]; then
                    say "warning: $c had $bad non-2xx responses or socket errors in round $r; its figures are suspect" >&2
                fi
            fi
        done
    done
done
sleep 1 # responses cut off when wrk stopped finish their accounting
rss_after=$(rss_kib "$PROXY_PID")
hwm=$(hwm_kib "$PROXY_PID")
rewritten_after=$(rewritten_total)

# ---------------------------------------------------------------------------------------------
# 6. The binary file through the pass-through ceiling and kmi-proxy, alternating.
say ""
say "== ${BINARY_MIB} MiB binary file, $BINARY_ROUNDS rounds each (curl, one connection, with the cookie) =="
binary_bytes=$((BINARY_MIB * 1024 * 1024))
for r in $(seq "$BINARY_ROUNDS"); do
    for c in proxy_pass kmi-proxy; do
        read -r size speed < <(curl -fsS --max-time 120 -o /dev/null -w '%{size_download} %{speed_download}\n' \
            -H "Cookie: $COOKIE" "$(url_of "$c")big.bin")
        if [ "$c" = kmi-proxy ]; then
            check "kmi-proxy, round $r: the binary arrived whole ($size of $binary_bytes bytes)" \
                "$([ "$size" = "$binary_bytes" ] && echo 0 || echo 1)"
        fi
        awk -v s="$speed" 'BEGIN { printf "%.1f\n", s / 1048576 }' >>"$WORK/binary-$c.txt"
        printf 'round %d, %-10s %8s MiB/s\n' "$r" "$c" "$(tail -n 1 "$WORK/binary-$c.txt")"
    done
done

# ---------------------------------------------------------------------------------------------
# 7. Medians, ratios, targets, checks.
growth_ok=$(awk -v a="$rss_after" -v w="$rss_warm" -v m="$RSS_GROWTH_MAX_PCT" 'BEGIN { print ((a <= w * (1 + m / 100)) ? 0 : 1) }')
growth_pct=$(awk -v a="$rss_after" -v w="$rss_warm" 'BEGIN { printf "%+.1f", 100 * (a - w) / w }')
check "kmi-proxy: RSS after the measured runs within ${RSS_GROWTH_MAX_PCT}% of RSS after warm-up ($(mib "$rss_warm") -> $(mib "$rss_after"), ${growth_pct}%)" "$growth_ok"

# Every request wrk completed was rewritten; wrk also abandons at most one in-flight request per
# connection when its time is up, which the proxy may have answered (and counted) all the same.
delta=$((rewritten_after - rewritten_before))
check "admin /metrics: responses_total{reason=\"rewritten\"} grew by $delta for $kmi_requests wrk requests in $kmi_runs runs (want $kmi_requests..$((kmi_requests + kmi_slack)))" \
    "$([ "$delta" -ge "$kmi_requests" ] && [ "$delta" -le $((kmi_requests + kmi_slack)) ] && echo 0 || echo 1)"

say ""
say "== summary: medians over $ROUNDS rounds of ${LOAD_SECONDS} s, page $origin_bytes bytes, cookie $COOKIE =="
printf '%-6s %-22s %12s %10s %10s %10s\n' "conns" "contender" "requests/s" "p50 ms" "p90 ms" "p99 ms"
declare -A RPS P50
for conns in $CONNS_LIST; do
    for c in "${CONTENDERS[@]}"; do
        files=("$WORK"/wrk-"$c"-c"$conns"-r*.out)
        RPS[$c,$conns]=$(for f in "${files[@]}"; do wrk_rps "$f"; done | median)
        P50[$c,$conns]=$(for f in "${files[@]}"; do to_ms "$(wrk_pct "$f" 50)"; done | median)
        p90=$(for f in "${files[@]}"; do to_ms "$(wrk_pct "$f" 90)"; done | median)
        p99=$(for f in "${files[@]}"; do to_ms "$(wrk_pct "$f" 99)"; done | median)
        printf '%-6s %-22s %12.0f %10s %10s %10s\n' "$conns" "$c" "${RPS[$c,$conns]}" "${P50[$c,$conns]}" "$p90" "$p99"
    done
done
bin_ngx=$(median <"$WORK/binary-proxy_pass.txt")
bin_kmi=$(median <"$WORK/binary-kmi-proxy.txt")
say "${BINARY_MIB} MiB binary: proxy_pass $bin_ngx MiB/s, kmi-proxy $bin_kmi MiB/s"

say ""
say "== the splice issue's targets (ratios of the medians) =="
for conns in $CONNS_LIST; do
    r_sub=$(ratio "${RPS[kmi-proxy,$conns]}" "${RPS[sub_filter,$conns]}")
    r_pass=$(ratio "${RPS[kmi-proxy,$conns]}" "${RPS[proxy_pass,$conns]}")
    r_noid=$(ratio "${RPS[kmi-proxy,$conns]}" "${RPS[kmi-no-id,$conns]}")
    r_chg=$(ratio "${RPS[kmi-changing,$conns]}" "${RPS[kmi-changing-nosplice,$conns]}")
    say "$conns connections: requests/s kmi-proxy / sub_filter = $r_sub (target >= 1.5: $(verdict "$r_sub" ge 1.5))"
    say "$conns connections: requests/s kmi-proxy / proxy_pass = $r_pass (target >= 1.0: $(verdict "$r_pass" ge 1.0))"
    say "$conns connections: requests/s kmi-proxy with an ID / without = $r_noid (target >= 0.85: $(verdict "$r_noid" ge 0.85))"
    say "$conns connections: changing page, splicing on / off = $r_chg (target >= 0.95: $(verdict "$r_chg" ge 0.95))"
    added=$(awk -v a="${P50[kmi-proxy,$conns]}" -v b="${P50[proxy_pass,$conns]}" 'BEGIN { if (a == "?" || b == "?") print "?"; else printf "%.3f\n", a - b }')
    if [ "$conns" = 32 ]; then
        say "32 connections: p50 kmi-proxy - proxy_pass = $added ms (target <= 0.3 ms: $(verdict "$added" le 0.3))"
    else
        say "$conns connections: p50 kmi-proxy - proxy_pass = $added ms"
    fi
done
r_bin=$(ratio "$bin_kmi" "$bin_ngx")
say "binary: throughput kmi-proxy / proxy_pass = $r_bin (target >= 0.95: $(verdict "$r_bin" ge 0.95))"
say "kmi-proxy idle RSS before any request: $(mib "$IDLE_RSS") (target <= 16 MiB: $(verdict "$IDLE_RSS" le 16384))"
say "kmi-proxy RSS: after warm-up $(mib "$rss_warm"), after the measured runs $(mib "$rss_after") (${growth_pct}%), peak (VmHWM) $(mib "$hwm")"
say ""
say "Note: wrk, nginx (origin and both nginx contenders, worker_processes auto) and kmi-proxy all share"
say "this machine's $(nproc) core(s) over loopback ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || echo unknown CPU));"
say "the figures compare the contenders under the same handicap, not what any of them does on cores of"
say "its own. The origin's work is part of every contender's run."
say ""
say "== checks =="
printf '%s\n' "${CHECKS[@]}"
if [ "${#FAILED[@]}" -gt 0 ]; then
    die "${#FAILED[@]} check(s) failed"
fi
say "all checks passed"
