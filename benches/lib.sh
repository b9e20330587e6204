# shellcheck shell=bash
# Shell helpers shared by benches/load.sh, benches/capacity.sh and benches/ab.sh. Sourced, not
# run; the caller defines die().

# Samples the machine for a second and warns when other processes (a compiler, say) keep it
# busy: they take CPU from whatever is measured and skew every figure.
warn_if_busy() {
    local total0 idle0 total1 idle1 busy
    read -r total0 idle0 < <(cpu_sample)
    sleep 1
    read -r total1 idle1 < <(cpu_sample)
    busy=$(awk -v t="$((total1 - total0))" -v i="$((idle1 - idle0))" 'BEGIN { printf "%.0f", t ? 100 * (t - i) / t : 0 }')
    if [ "$busy" -gt 10 ]; then
        printf 'warning: the machine was %s%% busy before the run; other processes compete for the CPU\n' "$busy" >&2
    fi
}
cpu_sample() { awk '/^cpu / { print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $5 + $6 }' /proc/stat; }

# Raises this shell's open-file limit (inherited by what it starts) to the hard limit, and dies
# when that is still below NEED. Arguments: NEED, the setting to lower instead.
raise_open_files() {
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    [ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge "$1" ] ||
        die "open-file limit $(ulimit -n) is below $1; raise it or lower $2"
}

# kmi-proxy as deployed: an admin listener, a text access log, the partner hosts in the caller's
# PARTNERS array. Arguments: the file, the listen, admin and origin ports, then lines of TOML to
# append.
write_kmi_config() {
    local file=$1 listen=$2 admin=$3 origin=$4 partner_list
    shift 4
    partner_list=$(printf '"%s", ' "${PARTNERS[@]}")
    cat >"$file" <<TOML
listen = "127.0.0.1:$listen"
upstream = "http://127.0.0.1:$origin"
shutdown_timeout = "2s"

[admin]
listen = "127.0.0.1:$admin"

[log]
format = "text"

[limits]
max_connections = 10000

[[partner]]
name = "cloudflare"
domains = [${partner_list%, }]
TOML
    [ "$#" = 0 ] || printf '%s\n' "" "$@" >>"$file"
}
