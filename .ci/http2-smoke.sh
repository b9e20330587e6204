#!/usr/bin/env bash
# A real HTTP/2 client against the real binary: curl (prior-knowledge h2c) and nghttp, through the
# built-in demo. Installs them on a fresh Debian machine. Loopback only, a few requests.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nghttp >/dev/null || ! curl --version | grep -q HTTP2; then
    apt-get update -qq && apt-get install -y -qq curl nghttp2-client >/dev/null
fi
cargo build --release --quiet
out=$(mktemp)
target/release/kmi-proxy demo --listen 127.0.0.1:0 >"$out" 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$out"' EXIT
for _ in $(seq 100); do grep -q "proxy on" "$out" && break; sleep 0.1; done
url=$(grep -o 'proxy on http://[0-9.:]*' "$out" | sed 's/proxy on //')
[ -n "$url" ] || { echo "demo did not start"; exit 1; }
id='Zk9%2BaB%2Fc3Q%3D%3D'
version=$(curl -s --http2-prior-knowledge -o /dev/null -w '%{http_version}' -H "Cookie: km_ai=$id" "$url/")
[ "$version" = 2 ] || { echo "curl did not speak HTTP/2 (got $version)"; exit 1; }
curl -s --http2-prior-knowledge -H "Cookie: km_ai=$id" "$url/" | grep -q "cart?kmi=$id" \
    || { echo "curl over h2c: no decorated link"; exit 1; }
nghttp -n -s "$url/" >/dev/null
nghttp -H "cookie: km_ai=$id" "$url/" | grep -q "cart?kmi=$id" \
    || { echo "nghttp: no decorated link"; exit 1; }
echo "http2 smoke: curl and nghttp got decorated pages over h2c"
