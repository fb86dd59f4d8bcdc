#!/usr/bin/env bash
# Builds the agent image (outpost/agent:dev) FROM scratch, offline: the
# agent binary plus the shared libraries it links (from this machine).
# Usage: images/build-agent.sh [BINARY] [TAG]
#   BINARY defaults to target/release/outpost-agent, else target/debug.
# Quiet on success; prints the image size.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${1:-}
tag=${2:-outpost/agent:dev}
if [ -z "$bin" ]; then
  for b in target/release/outpost-agent target/debug/outpost-agent; do
    [ -x "$b" ] && { bin=$b; break; }
  done
fi
[ -n "$bin" ] && [ -x "$bin" ] || { echo "build-agent.sh: no agent binary (cargo build -p outpost-agent)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
r="$tmp/rootfs"
mkdir -p "$r/etc/outpost-agent" "$r/tmp" "$r/var/lib/outpost-agent" "$r/run/outpost-agent"
chmod 1777 "$r/tmp"
# Debug info is not needed at run time.
objcopy --strip-debug "$bin" "$r/outpost-agent" 2>/dev/null || cp "$bin" "$r/outpost-agent"
chmod 0755 "$r/outpost-agent"
# The dynamic loader and every library the binary needs, at their paths.
ldd "$bin" | awk '/=> \//{print $3} /^[ \t]*\//{print $1}' | sort -u | while read -r lib; do
  mkdir -p "$r$(dirname "$lib")"
  cp -L "$lib" "$r$lib"
done
printf '%s\n' 'root:x:0:0:root:/:/outpost-agent' >"$r/etc/passwd"
printf '%s\n' 'root:x:0:' >"$r/etc/group"
printf '%s\n' 'hosts: files dns' >"$r/etc/nsswitch.conf"
cp images/agent/Dockerfile "$tmp/Dockerfile"

docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0
docker build -q --pull=false --network none -t "$tag" "$tmp" >/dev/null
docker image inspect -f '{{.Size}}' "$tag" | awk -v t="$tag" '{printf "%s: %.1f MiB\n", t, $1/1048576}'
