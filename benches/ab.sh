#!/usr/bin/env bash
# A/B of kmi-proxy builds (or settings) on the plain corpus page: the CPU each one spends per
# request, with a visitor ID (the page spliced from its recording) and without (passed through),
# and the requests/s wrk gets. For deciding whether a change to the request path is worth it:
# alternating rounds, so a machine that grows busier or cooler weighs on every contender alike.
#
#   benches/ab.sh                                      # the release binary against itself (noise)
#   benches/ab.sh /tmp/kmi-before target/release/kmi-proxy
#   benches/ab.sh target/release/kmi-proxy "MALLOC_ARENA_MAX=1 target/release/kmi-proxy"
#
# Each argument is a command (environment assignments allowed before the binary); it is started
# with `--config <a config in the temporary directory>`. One nginx serves
# ../shared/corpus/cloudflare.com.html as the origin; per round and contender, after two warm-up
# requests (the first records the page): `wrk -t2 -c32 -dSECONDS` with the cookie, then without.
# CPU per request is the proxy's utime+stime (from /proc/PID/stat) over the run divided by the
# requests wrk completed. Prints every round, then the medians and, per contender, the ratio
# with an ID / without. Loopback only, bounded in time; everything it starts is stopped on exit.
#
# Environment: ROUNDS (5), SECONDS_PER_RUN (4), CONNS (32). Needs nginx and wrk (as load.sh
# installs them).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { printf 'ab.sh: %s\n' "$*" >&2; exit 1; }
ROUNDS=${ROUNDS:-5}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-4}
CONNS=${CONNS:-32}
PAGE=../shared/corpus/cloudflare.com.html
COOKIE='Cookie: km_ai=Zk9%2BaB%2Fc3Q%3D%3D'
command -v nginx >/dev/null || die "nginx is missing (benches/load.sh installs it)"
command -v wrk >/dev/null || die "wrk is missing (benches/load.sh installs it)"
[ -f "$PAGE" ] || die "$PAGE is missing"
[ $# -gt 0 ] || set -- target/release/kmi-proxy target/release/kmi-proxy

# shellcheck source=benches/lib.sh
. benches/lib.sh
warn_if_busy

dir=$(mktemp -d /tmp/kmi-ab.XXXXXX)
chmod 755 "$dir" # nginx's worker reads the page as another user
proxy_pid=
cleanup() {
    [ -n "$proxy_pid" ] && kill "$proxy_pid" 2>/dev/null
    [ -f "$dir/nginx.pid" ] && nginx -p "$dir" -c "$dir/nginx.conf" -s stop 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
origin_port=$(free_port)
proxy_port=$(free_port)
mkdir -p "$dir/www" "$dir/logs"
cp "$PAGE" "$dir/www/index.html"
cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    types { text/html html; }
    server {
        listen 127.0.0.1:$origin_port;
        root $dir/www;
        location / { charset utf-8; }
    }
}
EOF
nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/nginx-error.log"
PARTNERS=(dash.cloudflare.com support.cloudflare.com community.cloudflare.com)
write_kmi_config "$dir/kmi.toml" "$proxy_port" "$(free_port)" "$origin_port"

url="http://127.0.0.1:$proxy_port/index.html"
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

# One contender, one round: prints "<us/req with ID> <req/s> <us/req without> <req/s>".
measure() {
    # shellcheck disable=SC2086 # the command is split on purpose: assignments, then the binary
    env $1 --config "$dir/kmi.toml" >/dev/null 2>"$dir/proxy.log" &
    proxy_pid=$!
    for _ in $(seq 50); do
        curl -s -o /dev/null "$url" 2>/dev/null && break
        sleep 0.1
    done
    curl -sf -o /dev/null -H "$COOKIE" "$url" || die "'$1' did not answer; see its log: $(tail -3 "$dir/proxy.log")"
    curl -sf -o "$dir/page" -H "$COOKIE" "$url"
    grep -q 'kmi=Zk9%2BaB%2Fc3Q%3D%3D' "$dir/page" || die "'$1' did not decorate the page"
    local out=() header n t0 t1
    for header in "$COOKIE" "X-Without-Id: 1"; do
        t0=$(ticks "$proxy_pid")
        n=$(wrk -t2 -c"$CONNS" -d"${SECONDS_PER_RUN}s" -H "$header" "$url" | awk '/requests in/ { print $1 }')
        t1=$(ticks "$proxy_pid")
        out+=("$(awk -v n="$n" -v t="$((t1 - t0))" -v hz="$hz" -v s="$SECONDS_PER_RUN" \
            'BEGIN { printf "%.1f %.0f", t / hz * 1e6 / n, n / s }')")
    done
    kill "$proxy_pid"
    wait "$proxy_pid" 2>/dev/null || true
    proxy_pid=
    echo "${out[0]} ${out[1]}"
}

declare -A results
printf '%-5s %-50s %12s %10s %12s %10s\n' round contender "us/req (ID)" "req/s" "us/req (no)" "req/s"
for round in $(seq "$ROUNDS"); do
    i=0
    for contender in "$@"; do
        line=$(measure "$contender")
        results[$i]+="$line"$'\n'
        # shellcheck disable=SC2086
        printf '%-5s %-50s %12s %10s %12s %10s\n' "$round" "$contender" $line
        i=$((i + 1))
    done
done

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo
echo "medians over $ROUNDS rounds of ${SECONDS_PER_RUN}s, wrk -t2 -c$CONNS:"
i=0
for contender in "$@"; do
    col() { printf '%s' "${results[$i]}" | awk -v c="$1" 'NF { print $c }' | median; }
    cpu_id=$(col 1) rps_id=$(col 2) cpu_no=$(col 3) rps_no=$(col 4)
    printf '%-50s with an ID %6s us/req %6s req/s; without %6s us/req %6s req/s; req/s with / without %s\n' \
        "$contender" "$cpu_id" "$rps_id" "$cpu_no" "$rps_no" \
        "$(awk -v a="$rps_id" -v b="$rps_no" 'BEGIN { printf "%.2f", a / b }')"
    i=$((i + 1))
done
