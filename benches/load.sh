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
# The compressed scenario (issue 15: real origins send HTML compressed), a round with
# `Accept-Encoding: gzip` and one with `Accept-Encoding: br` on every request: a second origin
# serves the same page, and a small stylesheet, compressed on the fly as nginx ships it (`gzip on`
# at nginx's level 1, `gzip_proxied off`; `brotli on` at the Debian brotli module's quality 6),
# and in front of it:
#
#   gzip-proxy_pass   nginx `proxy_pass`, passing the origin's compressed page through;
#   gzip-sub_filter   nginx `sub_filter` as above, asking the origin for identity (sub_filter
#                     cannot read a compressed body) and compressing its own output (`gzip on`,
#                     `brotli on`), as an operator would have to;
#   gzip-kmi-proxy    kmi-proxy configured as above, upstream = this origin; one process per
#                     coding, so each round meets a recording of its own coding and reads its
#                     own /metrics;
#
# and br-proxy_pass, br-sub_filter, br-kmi-proxy likewise.
#
#   benches/load.sh                                  # ~13 min after the build (ROUNDS=3, LOAD_SECONDS=10)
#   ROUNDS=5 LOAD_SECONDS=10 benches/load.sh         # the README's figures
#   ROUNDS=2 LOAD_SECONDS=5 BINARY_ROUNDS=2 benches/load.sh   # CI: ~5 min
#   SCENARIOS="gzip br" benches/load.sh              # the compressed scenario alone
#   KMI_FETCH_UNCOMPRESSED=0 SCENARIOS="gzip br" benches/load.sh
#                            # the same, kmi-proxy with rewrite.fetch_recorded_uncompressed = false
#                            # (the origin compresses every page kmi-proxy asks for)
#
# Loopback only, bounded in time; everything it starts lives in a temporary directory and is
# stopped on exit by its saved PID (nginx by `nginx -s stop` with its own pid file).
#
#   1. installs what a fresh Debian machine lacks (as root: nginx, wrk, curl, python3, and for the
#      brotli round nginx's brotli modules and the brotli tool) and runs `cargo build --release`;
#   2. one nginx (its own nginx.conf, pid file and error log in the temporary directory; access
#      log off; the brotli modules loaded by `load_module`) is both origins and, on more ports,
#      the nginx contenders;
#   3. kmi-proxy, configured as deployed (admin listener, access log to a file); its RSS before
#      any request is the idle RSS;
#   4. sanity: each contender returns the page (kmi-proxy and sub_filter with the ID in partner
#      links, proxy_pass byte for byte); then a warm-up through kmi-proxy (rounds of
#      WARMUP_SECONDS until its peak RSS settles). In the compressed rounds every response is
#      fetched as sent and decoded with gzip or brotli: nginx's must be compressed in the round's
#      coding; kmi-proxy's decorated page must be too, and decode to the page with the ID, the
#      spliced one equal to the recorded one; and a request without the cookie and the
#      stylesheet must come back through kmi-proxy compressed, as the origin sends them
#      (inserting the proxy changes nothing about compression); then one WARMUP_SECONDS run
#      per compressed-round kmi-proxy;
#   5. ROUNDS rounds; in each, for every connection count in CONNS_LIST, every contender gets
#      `wrk --latency -cN -dLOAD_SECONDS` with a km_ai cookie, in an order that rotates from round
#      to round (no contender always runs first on a cool machine or last on a hot one);
#   6. the 100 MiB file through proxy_pass and kmi-proxy with curl, BINARY_ROUNDS times each,
#      alternating;
#   7. medians over the rounds, the ratios and the performance issues' targets, printed as met or
#      NOT met (measurements on a shared machine: reported, not asserted); for each coding the
#      size of kmi-proxy's decorated response against the whole decorated page compressed once
#      (gzip -7, brotli quality 6), and the /metrics counters that say which path served the
#      round (pages_total: recorded, spliced, diverged; pages_verified_total: compressed or
#      decoded); then the checks, where any failure exits non-zero: kmi-proxy served no non-2xx
#      response and wrk saw no socket error (in the compressed rounds, where the origin's
#      compression puts every contender's tail past wrk's 2 s timeout at 256 connections, none
#      but timeouts, which are reported); the binary arrived whole; RSS after the measured
#      runs is no more than 10% above RSS after the warm-up (no leak); the admin /metrics counted
#      the measured requests as rewritten; the compressed rounds' responses averaged less than
#      half the page (they came compressed under load too).
#
# Environment: SCENARIOS ("plain gzip br": plain is everything above the compressed scenario,
# gzip and br its two rounds), ROUNDS (3), LOAD_SECONDS (10), CONNS_LIST ("32 256"),
# BINARY_ROUNDS (3), WARMUP_SECONDS (5, per round), WARMUP_ROUNDS_MAX (8), THREADS (2), KMI_CORPUS
# (directory holding cloudflare.com.html; default ../shared/corpus from the repository root),
# KEEP_WORK=1 keeps the temporary directory (configs, logs, wrk output) for inspection.
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
PLAIN_CONTENDERS=(proxy_pass sub_filter kmi-proxy kmi-no-id kmi-changing kmi-changing-nosplice)
SCENARIOS=${SCENARIOS:-plain gzip br}

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
for s in $SCENARIOS; do
    case $s in
        plain | gzip | br) ;;
        *) die "SCENARIOS holds plain, gzip and br, not '$s'" ;;
    esac
done
[ -n "${SCENARIOS// /}" ] || die "SCENARIOS is empty"
want() { [[ " $SCENARIOS " == *" $1 "* ]]; }
# The compressed scenario's rounds, one per coding wrk asks for.
CODINGS=()
for z in gzip br; do
    if want "$z"; then
        CODINGS+=("$z")
    fi
done
# The level each coding's reference size is compressed at: kmi-proxy's packed level
# (pack::PACK_LEVEL, one above gzip's default), and the brotli module's default quality, which
# the origin compresses at (kmi-proxy's packed quality too).
GZIP_REF_LEVEL=7
BROTLI_REF_QUALITY=6

# ---------------------------------------------------------------------------------------------
# 1. Tools and the build.
find_nginx() { command -v nginx 2>/dev/null || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true; }
missing=()
[ -n "$(find_nginx)" ] || missing+=(nginx)
command -v wrk >/dev/null || missing+=(wrk)
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3)
# Debian's brotli modules for nginx, where the .so files are (empty when not installed).
brotli_module() { dpkg -L "libnginx-mod-http-brotli-$1" 2>/dev/null | grep "/ngx_http_brotli_$1_module\.so\$" || true; }
if [ "${#CODINGS[@]}" -gt 0 ]; then
    command -v gzip >/dev/null || missing+=(gzip)
fi
if want br; then
    [ -n "$(brotli_module filter)" ] || missing+=(libnginx-mod-http-brotli-filter)
    [ -n "$(brotli_module static)" ] || missing+=(libnginx-mod-http-brotli-static)
    command -v brotli >/dev/null || missing+=(brotli)
fi
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
load_modules=
if want br; then
    for m in filter static; do
        so=$(brotli_module "$m")
        if [ -z "$so" ] || [ ! -r "$so" ]; then
            die "nginx's brotli $m module is not installed (apt-get install -y libnginx-mod-http-brotli-$m)"
        fi
        load_modules+="load_module $so;"$'\n'
    done
fi

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
# Every kmi-proxy started, by PID.
KMI_PIDS=()
NGINX_PID=
NGINX_STARTED=
nginx_ctl() { "$NGINX" -c "$WORK/nginx.conf" -p "$WORK/" -e "$WORK/nginx-error.log" "$@"; }
cleanup() {
    local status=$?
    trap - EXIT
    set +e
    for pid in "${KMI_PIDS[@]}"; do
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
        for f in proxy.log nosplice.log kmi-gzip.log kmi-br.log nginx-error.log; do
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
# All at once, so that no two are the same.
read -r ORIGIN_PORT NGINX_PROXY_PORT NGINX_SUB_PORT PROXY_PORT ADMIN_PORT NOSPLICE_PORT NOSPLICE_ADMIN_PORT \
    ZORIGIN_PORT ZPROXY_PORT ZSUB_PORT more_ports < <(free_ports $((10 + 2 * ${#CODINGS[@]})))
# The compressed scenario's kmi-proxy for each coding: its port, its admin port, its log.
declare -A KMI_PORT KMI_ADMIN KMI_LOG
for z in "${CODINGS[@]}"; do
    read -r "KMI_PORT[$z]" "KMI_ADMIN[$z]" more_ports <<<"$more_ports"
    KMI_LOG[$z]=kmi-$z.log
done

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
# 2. nginx: the origins and the nginx contenders, one master with its own files.
mkdir -p "$WORK/www" "$WORK/tmp"
cp "$PAGE" "$WORK/www/index.html"
# The changing page: the same page with a per-request token in its head, as a CSRF token or a
# CSP nonce would be.
sed '0,/<head>/s//<head><meta name="csrf-token" content="<!--# echo var="request_id" -->">/' "$PAGE" >"$WORK/www/changing.html"
grep -q 'echo var="request_id"' "$WORK/www/changing.html" || die "no <head> in $PAGE to put a token in"
if want plain; then
    head -c "$((BINARY_MIB * 1024 * 1024))" /dev/urandom >"$WORK/www/big.bin"
fi
# A static asset for the compressed scenario, as a page links to: about 9 KiB of stylesheet.
for i in $(seq 120); do
    printf '.partner-%d a[href^="https://dash.cloudflare.com/"] { color: #%06x; margin: %dpx; }\n' "$i" $((i * 2731)) "$i"
done >"$WORK/www/site.css"
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
# Brotli, for the compressed scenario's brotli round: on where gzip is, at the module's defaults.
brotli_origin=
brotli_sub=
if want br; then
    brotli_origin="brotli on; brotli_types text/css;"
    brotli_sub="brotli on;"
fi
cat >"$WORK/nginx.conf" <<NGINX
${load_modules}$user_line
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
    types { text/html html; text/css css; application/octet-stream bin; }
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

    # The compressing origin: the same page, and /site.css, compressed on the fly as nginx ships
    # it (gzip_comp_level 1; gzip_proxied off, so no compression for a request carrying Via;
    # text/html is always among the types). kmi-proxy in front of it must change nothing about
    # compression.
    server {
        listen 127.0.0.1:$ZORIGIN_PORT;
        root $WORK/www;
        gzip on;
        gzip_types text/css;
        $brotli_origin
        location / {
            charset utf-8;
            try_files /index.html =404;
        }
        location = /site.css {
        }
    }
    upstream zorigin {
        server 127.0.0.1:$ZORIGIN_PORT;
        keepalive $CONNS_MAX;
        keepalive_requests 10000000;
    }
    # proxy_pass in front of it passes the client's Accept-Encoding on and the compressed page
    # back.
    server {
        listen 127.0.0.1:$ZPROXY_PORT;
        location / {
            proxy_pass http://zorigin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
        }
    }
    # sub_filter asks for identity and compresses its own output, as an operator would have to.
    server {
        listen 127.0.0.1:$ZSUB_PORT;
        gzip on;
        $brotli_sub
        location / {
            proxy_pass http://zorigin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
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
wait_http "http://127.0.0.1:$ZORIGIN_PORT/" "the compressing nginx origin" "$NGINX_PID"
wait_http "http://127.0.0.1:$ZPROXY_PORT/" "the nginx proxy of the compressing origin" "$NGINX_PID"
wait_http "http://127.0.0.1:$ZSUB_PORT/" "the nginx sub_filter proxy of the compressing origin" "$NGINX_PID"
ctype=$(curl -fsS -o /dev/null -w '%{content_type}' "http://127.0.0.1:$ORIGIN_PORT/")
[ "$ctype" = "text/html; charset=utf-8" ] || die "the origin serves Content-Type '$ctype'"

# ---------------------------------------------------------------------------------------------
# 3. kmi-proxy, configured for the page's partner links.
# Starts the release binary on a configuration and waits for its admin listener; its PID is
# left in LAST_PID (and KMI_PIDS). Arguments: what to call it, the config, the log, admin port.
start_kmi() {
    "$BIN" check --config "$2" >/dev/null 2>"$WORK/check.err" ||
        die "kmi-proxy check rejected $2: $(cat "$WORK/check.err")"
    # One access-log line per request: to a file, never to a terminal.
    "$BIN" --config "$2" >/dev/null 2>"$3" &
    LAST_PID=$!
    KMI_PIDS+=("$LAST_PID")
    wait_http "http://127.0.0.1:$4/readyz" "$1" "$LAST_PID"
}
if want plain; then
    write_kmi_config "$WORK/kmi-proxy.toml" "$PROXY_PORT" "$ADMIN_PORT" "$ORIGIN_PORT"
    start_kmi kmi-proxy "$WORK/kmi-proxy.toml" "$WORK/proxy.log" "$ADMIN_PORT"
    PROXY_PID=$LAST_PID
    # The same proxy with splicing off, for the changing page.
    write_kmi_config "$WORK/kmi-nosplice.toml" "$NOSPLICE_PORT" "$NOSPLICE_ADMIN_PORT" "$ORIGIN_PORT" \
        "[rewrite]" "cache_bytes = 0"
    start_kmi "kmi-proxy (splicing off)" "$WORK/kmi-nosplice.toml" "$WORK/nosplice.log" "$NOSPLICE_ADMIN_PORT"
fi
# The compressed scenario: one kmi-proxy per coding in front of the compressing origin, so that
# each round meets a recording of its own coding and its /metrics count that round alone.
# As deployed, `rewrite.fetch_recorded_uncompressed` (on by default) asks for recorded pages
# uncompressed, so the origin does not compress them for kmi-proxy; KMI_FETCH_UNCOMPRESSED=0
# turns it off, and the origin compresses every page kmi-proxy asks for.
fetch_uncompressed=()
[ "${KMI_FETCH_UNCOMPRESSED:-1}" = 0 ] && fetch_uncompressed=("[rewrite]" "fetch_recorded_uncompressed = false")
for z in "${CODINGS[@]}"; do
    write_kmi_config "$WORK/kmi-$z.toml" "${KMI_PORT[$z]}" "${KMI_ADMIN[$z]}" "$ZORIGIN_PORT" \
        "${fetch_uncompressed[@]}"
    start_kmi "kmi-proxy ($z round)" "$WORK/kmi-$z.toml" "$WORK/${KMI_LOG[$z]}" "${KMI_ADMIN[$z]}"
done

url_of() { # contender
    case $1 in
        proxy_pass) echo "http://127.0.0.1:$NGINX_PROXY_PORT/" ;;
        sub_filter) echo "http://127.0.0.1:$NGINX_SUB_PORT/" ;;
        kmi-proxy | kmi-no-id) echo "http://127.0.0.1:$PROXY_PORT/" ;;
        kmi-changing) echo "http://127.0.0.1:$PROXY_PORT/changing" ;;
        kmi-changing-nosplice) echo "http://127.0.0.1:$NOSPLICE_PORT/changing" ;;
        # The compressed scenario's, named after the coding of their round.
        gzip-origin | br-origin) echo "http://127.0.0.1:$ZORIGIN_PORT/" ;;
        gzip-proxy_pass | br-proxy_pass) echo "http://127.0.0.1:$ZPROXY_PORT/" ;;
        gzip-sub_filter | br-sub_filter) echo "http://127.0.0.1:$ZSUB_PORT/" ;;
        gzip-kmi-proxy | br-kmi-proxy) echo "http://127.0.0.1:${KMI_PORT[${1%%-*}]}/" ;;
        *) die "no URL for contender '$1'" ;;
    esac
}
# The request headers wrk and curl send, as -H arguments one a line: the visitor's cookie, for
# every contender but the one measured without it.
headers_of() { # contender
    [ "$1" = kmi-no-id ] || printf '%s\n' -H "Cookie: $COOKIE"
    case $1 in
        gzip-* | br-*) printf '%s\n' -H "Accept-Encoding: ${1%%-*}" ;;
    esac
}
# kmi-proxy contenders, whose every response must be a 2xx.
is_kmi() { [[ $1 == kmi-* || $1 == *-kmi-proxy ]]; }
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
# One series of a kmi-proxy's /metrics, 0 when absent. Arguments: its admin port, the series as
# /metrics spells it (kmi_proxy_pages_total{reason="spliced"}).
metric() {
    curl -fsS --max-time 5 "http://127.0.0.1:$1/metrics" |
        awk -v s="$2" '$1 == s { v = $2 } END { printf "%d\n", v + 0 }'
}
rewritten_total() { metric "$1" 'kmi_proxy_responses_total{reason="rewritten"}'; } # admin port
pages_total() { metric "$1" "kmi_proxy_pages_total{reason=\"$2\"}"; } # admin port, path

# The number after "Non-2xx or 3xx responses:"; wrk prints that line only when there were some.
wrk_non2xx() { awk -F': *' '/Non-2xx or 3xx responses/ { n += $2 } END { print n + 0 }' "$1"; }
# "Socket errors: connect 0, read 0, write 0, timeout 0", likewise only when there were some.
wrk_sockerr() {
    awk '/Socket errors:/ { gsub(/,/, ""); for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+$/) n += $i } END { print n + 0 }' "$1"
}
# Of those, the requests wrk gave up on after its 2 s timeout.
wrk_timeouts() { awk '/Socket errors:/ { n += $NF } END { print n + 0 }' "$1"; }
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

# wrk's "N requests in 5.00s, 123.45MB read" as KiB read per request (headers included).
wrk_kib_per_request() {
    awk '/ requests in / {
        v = $5; sub(/read$/, "", v); match(v, /^[0-9.]+/); n = substr(v, 1, RLENGTH); u = substr(v, RLENGTH + 1)
        f = (u == "B") ? 1 / 1024 : (u == "KB") ? 1 : (u == "MB") ? 1024 : (u == "GB") ? 1048576 : (u == "TB") ? 1073741824 : -1
        if (f < 0 || $1 == 0) print "?"; else printf "%.1f\n", n * f / $1
    }' "$1"
}

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

# ---------------------------------------------------------------------------------------------
# 4. Sanity, then the warm-up.
plain_sanity() {
    local c bytes n
    for c in "${PLAIN_CONTENDERS[@]}"; do
        mapfile -t headers < <(headers_of "$c")
        bytes=$(curl -fsS --max-time 10 -o "$WORK/page-$c.html" -w '%{size_download}' "${headers[@]}" "$(url_of "$c")")
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
    n=$(pages_total "$ADMIN_PORT" spliced)
    check "kmi-proxy: /metrics counted the second request as spliced (pages_total{reason=\"spliced\"} = $n)" "$([ "$n" -ge 1 ] && echo 0 || echo 1)"
}

# Warm-up: rounds of WARMUP_SECONDS at the largest connection count until the peak RSS (VmHWM)
# grew by less than WARMUP_SETTLE_PCT over a round, at most WARMUP_ROUNDS_MAX rounds. The
# allocator's arenas grow to the footprint of the busiest moment: one short round falls short of
# it, and a measured run that merely reaches it would pass for a leak. Leaves RSS_WARM.
plain_warmup() {
    local round=0 c hwm_prev hwm_now grew settled
    say ""
    say "== warm-up through kmi-proxy: rounds of wrk -t$THREADS -c$CONNS_MAX -d${WARMUP_SECONDS}s on each of its paths until peak RSS settles =="
    hwm_prev=$(hwm_kib "$PROXY_PID")
    while :; do
        round=$((round + 1))
        # Every path the measured runs take through this proxy: spliced, parsed (the changing
        # page) and passed through (no cookie); each settles its own share of the allocator's
        # footprint.
        for c in kmi-changing kmi-no-id kmi-proxy; do
            mapfile -t headers < <(headers_of "$c")
            wrk -t"$THREADS" -c"$CONNS_MAX" -d"${WARMUP_SECONDS}s" "${headers[@]}" "$(url_of "$c")" >"$WORK/wrk-warmup.out" ||
                die "wrk failed against $(url_of "$c"): $(cat "$WORK/wrk-warmup.out")"
        done
        sleep 1
        RSS_WARM=$(rss_kib "$PROXY_PID")
        hwm_now=$(hwm_kib "$PROXY_PID")
        grew=$(awk -v a="$hwm_now" -v b="$hwm_prev" 'BEGIN { printf "%.1f", 100 * (a - b) / b }')
        say "round $round: $(wrk_requests "$WORK/wrk-warmup.out") requests, $(wrk_non2xx "$WORK/wrk-warmup.out") non-2xx, RSS $(mib "$RSS_WARM"), peak $(mib "$hwm_now") (+${grew}%)"
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
    say "kmi-proxy RSS after warm-up ($round rounds): $(mib "$RSS_WARM")"
}

# The body exactly as sent for Accept-Encoding: CODING, into FILE (its head into FILE.head);
# prints the response's Content-Encoding, empty when it came uncompressed. Arguments: URL,
# coding, file, then more curl arguments.
fetch_coded() {
    local url=$1 coding=$2 file=$3
    shift 3
    curl -fsS --max-time 10 -H "Accept-Encoding: $coding" -D "$file.head" -o "$file" "$@" "$url" ||
        die "GET $url with Accept-Encoding: $coding failed"
    awk 'tolower($1) == "content-encoding:" { v = $2; sub(/\r$/, "", v) } END { print v }' "$file.head"
}
# FILE decoded from CODING (a Content-Encoding, empty for none) onto standard output by the
# standard decoder, which fails on a corrupt or cut-short body (gzip also checks the trailer's
# CRC and length).
decode() { # coding, file
    case $1 in
        gzip) gzip -dc <"$2" ;;
        br) brotli -dc <"$2" ;;
        "") cat <"$2" ;;
        *) echo "no decoder for Content-Encoding '$1'" >&2 && return 1 ;;
    esac
}
# The whole of FILE compressed once at the reference level, onto standard output.
compress_ref() { # coding, file
    case $1 in
        gzip) gzip "-$GZIP_REF_LEVEL" -n -c <"$2" ;;
        br) brotli -q "$BROTLI_REF_QUALITY" -c <"$2" ;;
    esac
}
decorated_links() { { grep -o -F "$DECORATED" "$1" || true; } | wc -l; } # file
bytes_of() { wc -c <"$1"; }
# 0 when the command succeeds, 1 when it fails: check's second argument.
passes() { if "$@"; then echo 0; else echo 1; fi; }
# kmi-proxy's decorated response in each coding and the reference it is held against, in bytes.
declare -A Z_SIZE Z_REF Z_ORIGIN

# The compressed scenario's sanity for one coding. The origin and the nginx contenders must do
# what the bench needs of them (else it dies); kmi-proxy's answers are checks.
compressed_sanity() { # coding
    local z=$1 c ce f n page=$WORK/www/index.html css=$WORK/www/site.css
    for c in "$z-origin" "$z-proxy_pass" "$z-sub_filter"; do
        f=$WORK/page-$c
        ce=$(fetch_coded "$(url_of "$c")" "$z" "$f" -H "Cookie: $COOKIE")
        [ "$ce" = "$z" ] || die "$c answered Accept-Encoding: $z with Content-Encoding '${ce:-none}'; see $WORK/nginx.conf"
        decode "$z" "$f" >"$f.html" || die "$c sent a $z body that its decoder rejects"
        n=$(decorated_links "$f.html")
        say "sanity ($z): GET $(url_of "$c") as $c -> $(bytes_of "$f") bytes $z, $(bytes_of "$f.html") decoded, $n links carry $DECORATED"
        case $c in
            *-sub_filter) [ "$n" -gt 0 ] || die "nginx sub_filter substituted nothing in the $z round; see $WORK/nginx.conf" ;;
            *) cmp -s "$f.html" "$page" || die "$c's page, decoded, is not the origin page" ;;
        esac
    done
    Z_ORIGIN[$z]=$(bytes_of "$WORK/page-$z-origin")
    f=$WORK/css-$z-origin
    ce=$(fetch_coded "$(url_of "$z-origin")site.css" "$z" "$f")
    [ "$ce" = "$z" ] || die "the compressing origin sent site.css with Content-Encoding '${ce:-none}' for Accept-Encoding: $z"

    # kmi-proxy: a visitor's first request records the page, the second is spliced from it.
    c=$z-kmi-proxy
    for step in recorded spliced; do
        f=$WORK/page-$c-$step
        ce=$(fetch_coded "$(url_of "$c")" "$z" "$f" -H "Cookie: $COOKIE")
        check "$c, $step: the decorated page came compressed (Content-Encoding: ${ce:-none}; want $z)" "$(passes [ "$ce" = "$z" ])"
        # Decoded as it says it is coded, so that the page is judged even when it came otherwise.
        decode "$ce" "$f" >"$f.html" 2>"$f.err" ||
            check "$c, $step: the ${ce:-none} decoder accepts the body ($(head -c 200 "$f.err" | tr '\n' ' '))" 1
        n=$(decorated_links "$f.html")
        say "sanity ($z): GET $(url_of "$c") as $c ($step) -> $(bytes_of "$f") bytes ${ce:-uncompressed}, $(bytes_of "$f.html") decoded, $n links carry $DECORATED"
        check "$c, $step: decoded, the page is decorated ($n x $DECORATED)" "$(passes [ "$n" -gt 0 ])"
    done
    check "$c: the spliced page, decoded, equals the recorded one byte for byte" \
        "$(passes cmp -s "$WORK/page-$c-spliced.html" "$WORK/page-$c-recorded.html")"
    n=$(pages_total "${KMI_ADMIN[$z]}" spliced)
    check "$c: /metrics counted the second request as spliced (pages_total{reason=\"spliced\"} = $n)" "$(passes [ "$n" -ge 1 ])"
    Z_SIZE[$z]=$(bytes_of "$WORK/page-$c-spliced")
    Z_REF[$z]=$(compress_ref "$z" "$WORK/page-$c-spliced.html" | wc -c)

    # Inserting the proxy changes nothing about compression: a page it does not decorate and a
    # static asset come back compressed as the origin sends them.
    f=$WORK/page-$c-no-id
    ce=$(fetch_coded "$(url_of "$c")" "$z" "$f")
    check "$c without the cookie: the page came compressed (Content-Encoding: ${ce:-none}; want $z)" "$(passes [ "$ce" = "$z" ])"
    decode "$ce" "$f" >"$f.html" 2>/dev/null || true
    check "$c without the cookie: decoded, the page is the origin's" "$(passes cmp -s "$f.html" "$page")"
    f=$WORK/css-$c
    ce=$(fetch_coded "$(url_of "$c")site.css" "$z" "$f" -H "Cookie: $COOKIE")
    check "$c: the static site.css came compressed (Content-Encoding: ${ce:-none}; want $z)" "$(passes [ "$ce" = "$z" ])"
    decode "$ce" "$f" >"$f.decoded" 2>/dev/null || true
    check "$c: site.css, decoded, is the origin's" "$(passes cmp -s "$f.decoded" "$css")"
}

# A short warm-up of each compressed-round kmi-proxy, which nothing has loaded yet.
compressed_warmup() {
    local z c
    say ""
    say "== warm-up of the compressed rounds' kmi-proxy: wrk -t$THREADS -c$CONNS_MAX -d${WARMUP_SECONDS}s each =="
    for z in "${CODINGS[@]}"; do
        c=$z-kmi-proxy
        mapfile -t headers < <(headers_of "$c")
        wrk -t"$THREADS" -c"$CONNS_MAX" -d"${WARMUP_SECONDS}s" "${headers[@]}" "$(url_of "$c")" >"$WORK/wrk-warmup-$z.out" ||
            die "wrk failed against $(url_of "$c"): $(cat "$WORK/wrk-warmup-$z.out")"
        say "$c: $(wrk_requests "$WORK/wrk-warmup-$z.out") requests, $(wrk_non2xx "$WORK/wrk-warmup-$z.out") non-2xx, $(wrk_kib_per_request "$WORK/wrk-warmup-$z.out") KiB per response"
    done
}

MEASURED=()
if want plain; then
    IDLE_RSS=$(rss_kib "$PROXY_PID")
    plain_sanity
    plain_warmup
    MEASURED+=("${PLAIN_CONTENDERS[@]}")
fi
if [ "${#CODINGS[@]}" -gt 0 ]; then
    say ""
    for z in "${CODINGS[@]}"; do
        compressed_sanity "$z"
        MEASURED+=("$z-proxy_pass" "$z-sub_filter" "$z-kmi-proxy")
    done
    compressed_warmup
fi

# ---------------------------------------------------------------------------------------------
# 5. Measured rounds: every contender of every scenario at every connection count, in an order
#    that rotates from round to round.
say ""
say "== $ROUNDS rounds: wrk -t$THREADS -c<conns> -d${LOAD_SECONDS}s --latency -H 'Cookie: $COOKIE' per contender =="
if [ "${#CODINGS[@]}" -gt 0 ]; then
    say "   (gzip-* and br-* also with -H 'Accept-Encoding: gzip' or 'br')"
fi
kmi_requests=0
kmi_runs=0
kmi_slack=0
if want plain; then
    rewritten_before=$(rewritten_total "$ADMIN_PORT")
fi
# The same accounting for each compressed round's kmi-proxy.
declare -A Z_REQUESTS Z_SLACK Z_REWRITTEN_BEFORE Z_REWRITTEN_AFTER
for z in "${CODINGS[@]}"; do
    Z_REQUESTS[$z]=0
    Z_SLACK[$z]=0
    Z_REWRITTEN_BEFORE[$z]=$(rewritten_total "${KMI_ADMIN[$z]}")
done
n_contenders=${#MEASURED[@]}
for r in $(seq "$ROUNDS"); do
    for conns in $CONNS_LIST; do
        order=()
        for i in $(seq 0 $((n_contenders - 1))); do
            order+=("${MEASURED[$(((i + r) % n_contenders))]}")
        done
        for c in "${order[@]}"; do
            out="$WORK/wrk-$c-c$conns-r$r.out"
            mapfile -t headers < <(headers_of "$c")
            wrk -t"$THREADS" -c"$conns" -d"${LOAD_SECONDS}s" --latency "${headers[@]}" "$(url_of "$c")" >"$out" ||
                die "wrk failed against $c: $(cat "$out")"
            printf 'round %d, %4d connections, %-21s %9.0f req/s  p50 %9s ms  p99 %9s ms\n' "$r" "$conns" "$c" \
                "$(wrk_rps "$out")" "$(to_ms "$(wrk_pct "$out" 50)")" "$(to_ms "$(wrk_pct "$out" 99)")"
            if is_kmi "$c"; then
                n=$(wrk_non2xx "$out")
                check "$c, round $r, $conns connections: non-2xx responses = $n (want 0)" "$([ "$n" = 0 ] && echo 0 || echo 1)"
                n=$(wrk_sockerr "$out")
                if [[ $c == *-kmi-proxy ]]; then
                    # Every compressed round's request makes the origin compress the page, so at
                    # 256 connections on 2 shared cores the tail passes wrk's 2 s timeout for
                    # every contender alike, nginx's too: timeouts are reported there, and the
                    # connection's own errors checked.
                    t=$(wrk_timeouts "$out")
                    if [ "$t" -gt 0 ]; then
                        say "note: $c had $t requests past wrk's 2 s timeout in round $r at $conns connections (see the nginx contenders' warnings for theirs)" >&2
                    fi
                    n=$((n - t))
                    check "$c, round $r, $conns connections: connect, read and write errors = $n (want 0)" "$([ "$n" = 0 ] && echo 0 || echo 1)"
                else
                    check "$c, round $r, $conns connections: socket errors = $n (want 0)" "$([ "$n" = 0 ] && echo 0 || echo 1)"
                fi
            else
                bad=$(($(wrk_non2xx "$out") + $(wrk_sockerr "$out")))
                if [ "$bad" -gt 0 ]; then
                    say "warning: $c had $bad non-2xx responses or socket errors in round $r; its figures are suspect" >&2
                fi
            fi
            if rewrites_on_main "$c"; then
                kmi_requests=$((kmi_requests + $(wrk_requests "$out")))
                kmi_runs=$((kmi_runs + 1))
                kmi_slack=$((kmi_slack + conns))
            elif [[ $c == *-kmi-proxy ]]; then
                z=${c%%-*}
                Z_REQUESTS[$z]=$((Z_REQUESTS[$z] + $(wrk_requests "$out")))
                Z_SLACK[$z]=$((Z_SLACK[$z] + conns))
            fi
        done
    done
done
sleep 1 # responses cut off when wrk stopped finish their accounting
if want plain; then
    rss_after=$(rss_kib "$PROXY_PID")
    hwm=$(hwm_kib "$PROXY_PID")
    rewritten_after=$(rewritten_total "$ADMIN_PORT")
fi
for z in "${CODINGS[@]}"; do
    Z_REWRITTEN_AFTER[$z]=$(rewritten_total "${KMI_ADMIN[$z]}")
done

# ---------------------------------------------------------------------------------------------
# 6. The binary file through the pass-through ceiling and kmi-proxy, alternating.
plain_binary() {
    local r c size speed binary_bytes=$((BINARY_MIB * 1024 * 1024))
    say ""
    say "== ${BINARY_MIB} MiB binary file, $BINARY_ROUNDS rounds each (curl, one connection, with the cookie) =="
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
}
if want plain; then
    plain_binary
fi

# ---------------------------------------------------------------------------------------------
# 7. Medians, ratios, targets, checks.
plain_checks() {
    local growth_ok delta
    growth_ok=$(awk -v a="$rss_after" -v w="$RSS_WARM" -v m="$RSS_GROWTH_MAX_PCT" 'BEGIN { print ((a <= w * (1 + m / 100)) ? 0 : 1) }')
    growth_pct=$(awk -v a="$rss_after" -v w="$RSS_WARM" 'BEGIN { printf "%+.1f", 100 * (a - w) / w }')
    check "kmi-proxy: RSS after the measured runs within ${RSS_GROWTH_MAX_PCT}% of RSS after warm-up ($(mib "$RSS_WARM") -> $(mib "$rss_after"), ${growth_pct}%)" "$growth_ok"

    # Every request wrk completed was rewritten; wrk also abandons at most one in-flight request
    # per connection when its time is up, which the proxy may have answered (and counted) all
    # the same.
    delta=$((rewritten_after - rewritten_before))
    check "admin /metrics: responses_total{reason=\"rewritten\"} grew by $delta for $kmi_requests wrk requests in $kmi_runs runs (want $kmi_requests..$((kmi_requests + kmi_slack)))" \
        "$([ "$delta" -ge "$kmi_requests" ] && [ "$delta" -le $((kmi_requests + kmi_slack)) ] && echo 0 || echo 1)"
}
if want plain; then
    plain_checks
fi
# Each compressed round's kmi-proxy rewrote every request, and sent them compressed: a response
# that came uncompressed would average the whole page.
compressed_checks() {
    local z delta kib files f
    for z in "${CODINGS[@]}"; do
        delta=$((Z_REWRITTEN_AFTER[$z] - Z_REWRITTEN_BEFORE[$z]))
        check "$z-kmi-proxy admin /metrics: responses_total{reason=\"rewritten\"} grew by $delta for ${Z_REQUESTS[$z]} wrk requests (want ${Z_REQUESTS[$z]}..$((Z_REQUESTS[$z] + Z_SLACK[$z])))" \
            "$([ "$delta" -ge "${Z_REQUESTS[$z]}" ] && [ "$delta" -le $((Z_REQUESTS[$z] + Z_SLACK[$z])) ] && echo 0 || echo 1)"
        files=("$WORK"/wrk-"$z"-kmi-proxy-c*-r*.out)
        kib=$(for f in "${files[@]}"; do wrk_kib_per_request "$f"; done | median)
        check "$z-kmi-proxy: under load the responses came compressed ($kib KiB each, headers included; the page is $((origin_bytes / 1024)) KiB)" \
            "$(passes awk -v k="$kib" -v p="$origin_bytes" 'BEGIN { exit !(k != "?" && k * 1024 < p / 2) }')"
    done
}
compressed_checks

say ""
say "== summary: medians over $ROUNDS rounds of ${LOAD_SECONDS} s, page $origin_bytes bytes, cookie $COOKIE =="
printf '%-6s %-22s %12s %10s %10s %10s %10s\n' "conns" "contender" "requests/s" "p50 ms" "p90 ms" "p99 ms" "KiB/resp"
declare -A RPS P50
for conns in $CONNS_LIST; do
    for c in "${MEASURED[@]}"; do
        files=("$WORK"/wrk-"$c"-c"$conns"-r*.out)
        RPS[$c,$conns]=$(for f in "${files[@]}"; do wrk_rps "$f"; done | median)
        P50[$c,$conns]=$(for f in "${files[@]}"; do to_ms "$(wrk_pct "$f" 50)"; done | median)
        p90=$(for f in "${files[@]}"; do to_ms "$(wrk_pct "$f" 90)"; done | median)
        p99=$(for f in "${files[@]}"; do to_ms "$(wrk_pct "$f" 99)"; done | median)
        kib=$(for f in "${files[@]}"; do wrk_kib_per_request "$f"; done | median)
        printf '%-6s %-22s %12.0f %10s %10s %10s %10.1f\n' "$conns" "$c" "${RPS[$c,$conns]}" "${P50[$c,$conns]}" "$p90" "$p99" "$kib"
    done
done

plain_targets() {
    local conns r_sub r_pass r_noid r_chg added bin_ngx bin_kmi r_bin
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
    say "kmi-proxy RSS: after warm-up $(mib "$RSS_WARM"), after the measured runs $(mib "$rss_after") (${growth_pct}%), peak (VmHWM) $(mib "$hwm")"
}
if want plain; then
    plain_targets
fi

# The counters that say which path served a compressed round: pages_total by path (recorded,
# spliced, diverged, parsed) and pages_verified_total by how the origin's body was compared
# (compressed: its compressed bytes were the recorded ones, nothing decoded; decoded: it was
# decoded and compared). Since the proxy started, sanity requests and warm-up included.
splice_counters() { # admin port
    curl -fsS --max-time 5 "http://127.0.0.1:$1/metrics" | awk '
        match($1, /^kmi_proxy_pages(_verified)?_total\{reason="[a-z_]+"\}$/) {
            name = $1; sub(/^kmi_proxy_/, "", name); sub(/\{.*/, "", name)
            reason = $1; sub(/^[^"]*"/, "", reason); sub(/".*/, "", reason)
            line[name] = line[name] " " reason "=" $2
        }
        END {
            printf "pages_total%s; pages_verified_total%s\n", line["pages_total"] ? line["pages_total"] : " (none)",
                line["pages_verified_total"] ? line["pages_verified_total"] : " (none)"
        }'
}
compressed_targets() { # coding
    local z=$1 conns r_sub r_pass growth within ref_name
    say ""
    say "== compressed pages, Accept-Encoding: $z: issue 15's targets (ratios of the medians) =="
    for conns in $CONNS_LIST; do
        r_sub=$(ratio "${RPS[$z-kmi-proxy,$conns]}" "${RPS[$z-sub_filter,$conns]}")
        r_pass=$(ratio "${RPS[$z-kmi-proxy,$conns]}" "${RPS[$z-proxy_pass,$conns]}")
        say "$z, $conns connections: requests/s kmi-proxy / sub_filter = $r_sub (target >= 1.5: $(verdict "$r_sub" ge 1.5))"
        say "$z, $conns connections: requests/s kmi-proxy / proxy_pass = $r_pass (target >= 1.0: $(verdict "$r_pass" ge 1.0))"
    done
    case $z in
        gzip) ref_name="gzip -$GZIP_REF_LEVEL" ;;
        br) ref_name="brotli -q $BROTLI_REF_QUALITY" ;;
    esac
    growth=$(awk -v a="${Z_SIZE[$z]}" -v b="${Z_REF[$z]}" 'BEGIN { printf "%+.1f", 100 * (a - b) / b }')
    within=$(awk -v a="${Z_SIZE[$z]}" -v b="${Z_REF[$z]}" 'BEGIN { print (a <= b * 1.05) ? "met" : "NOT met" }')
    say "$z: kmi-proxy's decorated response ${Z_SIZE[$z]} bytes; $ref_name of the whole decorated page ${Z_REF[$z]} bytes (${growth}%);" \
        "within 5%: $within (the origin sends the undecorated page in ${Z_ORIGIN[$z]} bytes)"
    say "$z: kmi-proxy /metrics: $(splice_counters "${KMI_ADMIN[$z]}")"
}
for z in "${CODINGS[@]}"; do
    compressed_targets "$z"
done
say ""
say "Note: wrk, nginx (the origins and the nginx contenders, worker_processes auto) and kmi-proxy all share"
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
