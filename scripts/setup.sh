#!/usr/bin/env bash
# Idempotent machine setup for development and CI (fresh Debian + Docker).
# Quiet on success; on failure prints the log (.cache/setup.log).
set -euo pipefail
cd "$(dirname "$0")/.."

mkdir -p .cache
LOG=.cache/setup.log
: >"$LOG"
on_exit() {
  local rc=$?
  if [ $rc -ne 0 ]; then echo "setup.sh: FAILED (exit $rc); log follows:" >&2; cat "$LOG" >&2; fi
}
trap on_exit EXIT

APT_PACKAGES=(protobuf-compiler busybox-static iproute2 iptables python3-venv e2fsprogs mount libc6-dev systemd)

step() { echo "--- $*" >>"$LOG"; }

step "apt packages"
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update >>"$LOG" 2>&1
  apt-get install -y --no-install-recommends "${missing[@]}" >>"$LOG" 2>&1
fi
command -v docker >/dev/null || { echo "docker CLI not found" >>"$LOG"; exit 1; }

step "PostgreSQL server binaries (the store tests start their own throwaway clusters)"
if ! dpkg-query -W -f='${Status}' postgresql 2>/dev/null | grep -q 'install ok installed'; then
  # Only the binaries: no system-wide cluster, so no server the package would start.
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/outpost-tests.conf
  export DEBIAN_FRONTEND=noninteractive
  apt-get update >>"$LOG" 2>&1
  apt-get install -y --no-install-recommends postgresql >>"$LOG" 2>&1
fi
ls /usr/lib/postgresql/*/bin/initdb >>"$LOG" 2>&1 || { echo "PostgreSQL's initdb not found" >>"$LOG"; exit 1; }
# initdb and postgres refuse root: as root the tests run them as this user.
[ "$(id -u)" != 0 ] || getent passwd postgres >/dev/null || { echo "no postgres user" >>"$LOG"; exit 1; }

step "python venv (.cache/venv) with moto[server]"
[ -x .cache/venv/bin/python ] || python3 -m venv .cache/venv >>"$LOG" 2>&1
if ! .cache/venv/bin/python -c 'import moto, flask, flask_cors' 2>/dev/null; then
  # Tolerant: moto is only needed by later tests; do not fail the whole setup.
  if ! .cache/venv/bin/python -m pip install -q --disable-pip-version-check 'moto[server]' >>"$LOG" 2>&1; then
    echo "setup.sh: warning: pip install moto[server] failed; see $LOG" >&2
  fi
fi

step "python venv (.cache/validators): deployment validators, Prometheus text parser"
# A venv of their own: checkov pins versions moto does not share.
[ -x .cache/validators/bin/python ] || python3 -m venv .cache/validators >>"$LOG" 2>&1
if ! .cache/validators/bin/python -c 'import checkov, kubernetes_validate, hcl2, prometheus_client' 2>/dev/null; then
  .cache/validators/bin/python -m pip install -q --disable-pip-version-check \
    checkov kubernetes-validate python-hcl2 prometheus-client >>"$LOG" 2>&1
fi
command -v kubectl >/dev/null || { echo "kubectl not found (kustomize)" >>"$LOG"; exit 1; }
command -v systemd-analyze >/dev/null || { echo "systemd-analyze not found" >>"$LOG"; exit 1; }

step "runner image (downloads terraform wrappers into .cache/terraform)"
images/build-runner.sh >>"$LOG" 2>&1
