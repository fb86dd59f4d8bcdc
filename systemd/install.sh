#!/usr/bin/env bash
# Installs the Outpost agent as a systemd service on this host.
#
#   systemd/install.sh BINARY CA_PEM AGENT_PEM AGENT_KEY [CONFIG]
#
# Idempotent: re-running replaces the binary and the unit, keeps an existing
# /etc/outpost-agent/agent.toml unless CONFIG is given. Needs root, systemd and
# a Docker engine. Does not start the service: check the configuration, then
# `systemctl enable --now outpost-agent`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

if [ $# -lt 4 ] || [ $# -gt 5 ]; then
  echo "usage: $0 BINARY CA_PEM AGENT_PEM AGENT_KEY [CONFIG]" >&2
  exit 2
fi
bin=$1 ca=$2 cert=$3 key=$4 config=${5:-}
[ "$(id -u)" -eq 0 ] || { echo "install.sh: must run as root" >&2; exit 1; }
for f in "$bin" "$ca" "$cert" "$key" ${config:+"$config"}; do
  [ -f "$f" ] || { echo "install.sh: $f: no such file" >&2; exit 1; }
done
command -v systemctl >/dev/null || { echo "install.sh: systemd is required" >&2; exit 1; }

# The service's own user: no login, no home, no groups.
if ! getent passwd outpost-agent >/dev/null; then
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin outpost-agent
fi

install -m 0755 "$bin" /usr/local/bin/outpost-agent
install -d -m 0755 /etc/outpost-agent
install -m 0644 "$ca" /etc/outpost-agent/ca.pem
install -m 0644 "$cert" /etc/outpost-agent/agent.pem
# Read by PID 1 only (LoadCredential=), handed to the service alone.
install -m 0600 -o root -g root "$key" /etc/outpost-agent/agent.key
if [ -n "$config" ]; then
  install -m 0644 "$config" /etc/outpost-agent/agent.toml
elif [ ! -f /etc/outpost-agent/agent.toml ]; then
  install -m 0644 "$here/agent.toml.example" /etc/outpost-agent/agent.toml
fi
install -m 0644 "$here/outpost-agent.service" /etc/systemd/system/outpost-agent.service

systemd-analyze verify /etc/systemd/system/outpost-agent.service
systemctl daemon-reload
echo "installed; next: edit /etc/outpost-agent/agent.toml, then systemctl enable --now outpost-agent"
