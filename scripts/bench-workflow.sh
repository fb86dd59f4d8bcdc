#!/usr/bin/env bash
# Measures the Terraform workflow against bare `docker run`, on this machine:
#   - commit → UNCONFIRMED for a one-resource stack (median of N; `stack sync`
#     right after the commit, so no poll interval is counted);
#   - approve → FINISHED (the apply phase);
#   - the same `terraform init` + `plan -out` and `init` + `apply` run directly
#     with `docker run` of the runner image (median of N).
# Usage: scripts/bench-workflow.sh [N]   (needs target/debug/outpost built)
set -euo pipefail
N="${1:-5}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUTPOST="${OUTPOST:-$ROOT/target/debug/outpost}"
IMAGE="outpost/runner:dev"
WORK="$(mktemp -d)"
STATE="$WORK/state"
trap 'kill "$DEV" 2>/dev/null || true; wait "$DEV" 2>/dev/null || true; rm -rf "$WORK"' EXIT

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# The configuration, in a git repository.
REPO="$WORK/repo"
mkdir -p "$REPO"
write_tf() {
  cat > "$REPO/main.tf" <<TF
terraform {
  required_providers {
    null = {
      source  = "hashicorp/null"
      version = "~> 2.1"
    }
  }
}
resource "null_resource" "r" {
  triggers = { round = "$1" }
}
TF
}
git -C "$REPO" init -q -b main .
write_tf 0
git -C "$REPO" -c user.name=b -c user.email=b@example.com add -A
git -C "$REPO" -c user.name=b -c user.email=b@example.com commit -qm first

# Bare docker run: init + plan -out, then init + apply of that plan.
bare_plan=(); bare_apply=()
for i in $(seq 1 "$N"); do
  d="$WORK/bare-$i"; cp -r "$REPO" "$d"; rm -rf "$d/.git"; chmod -R a+rwX "$d"
  t0=$(now)
  docker run --rm --network none -v "$d:/w" -w /w "$IMAGE" sh -c \
    'terraform init -input=false -no-color >/dev/null && terraform plan -input=false -no-color -out=/w/tfplan -detailed-exitcode >/dev/null; [ $? -eq 2 ]'
  t1=$(now)
  docker run --rm --network none -v "$d:/w" -w /w "$IMAGE" sh -c \
    'terraform init -input=false -no-color >/dev/null && terraform apply -input=false -no-color -auto-approve /w/tfplan >/dev/null'
  t2=$(now)
  bare_plan+=("$(echo "$t1 - $t0" | bc)"); bare_apply+=("$(echo "$t2 - $t1" | bc)")
done

# Outpost: dev control plane + local agent.
"$OUTPOST" --state-dir "$STATE" dev --capacity 2 >"$WORK/dev.log" 2>&1 &
DEV=$!
for _ in $(seq 1 300); do [ -s "$STATE/server.addr" ] && grep -q connected "$WORK/dev.log" && break; sleep 0.2; done
op() { "$OUTPOST" --state-dir "$STATE" "$@"; }
op pki issue admin reviewer >/dev/null
cat > "$WORK/stacks.toml" <<TOML
[[stack]]
name = "bench"
repo = "file://$REPO"
image = "$IMAGE"
TOML
op stack apply -f "$WORK/stacks.toml" >/dev/null
wait_state() { # RUN STATE...
  local run=$1; shift
  for _ in $(seq 1 3000); do
    s=$(op run show "$run" --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
    for want in "$@"; do [ "$s" = "$want" ] && { echo "$s"; return; }; done
    sleep 0.1
  done
  echo "timeout" ; return 1
}
op_plan=(); op_apply=()
for i in $(seq 1 "$N"); do
  write_tf "$i"
  git -C "$REPO" -c user.name=b -c user.email=b@example.com commit -qam "round $i"
  t0=$(now)
  run=$(op stack sync bench --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["run_id"])')
  s=$(wait_state "$run" UNCONFIRMED FAILED FINISHED); t1=$(now)
  [ "$s" = UNCONFIRMED ] || { echo "run $run ended $s"; exit 1; }
  op --admin reviewer run approve "$run" >/dev/null
  t2=$(now)
  s=$(wait_state "$run" FINISHED FAILED STALE); t3=$(now)
  [ "$s" = FINISHED ] || { echo "run $run ended $s"; op run show "$run"; exit 1; }
  op_plan+=("$(echo "$t1 - $t0" | bc)"); op_apply+=("$(echo "$t3 - $t2" | bc)")
done
printf 'bare docker run: plan (init+plan) median %.2fs; apply (init+apply) median %.2fs\n' \
  "$(printf '%s\n' "${bare_plan[@]}" | median)" "$(printf '%s\n' "${bare_apply[@]}" | median)"
printf 'outpost: commit→UNCONFIRMED median %.2fs; approve→FINISHED median %.2fs (poll 0.1s)\n' \
  "$(printf '%s\n' "${op_plan[@]}" | median)" "$(printf '%s\n' "${op_apply[@]}" | median)"
