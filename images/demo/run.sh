#!/bin/sh
# Demo job: run the baked-in Terraform config in the writable workspace.
# Usage (inside outpost/runner): sh /opt/outpost/demo/run.sh
set -eu

src=$(dirname "$0")
ws=${OUTPOST_WORKSPACE:-/workspace}

banner() { printf '\n==> %s\n' "$*"; }

banner "outpost demo: preparing $ws"
cd "$ws"
cp "$src/main.tf" ./main.tf
terraform version

banner "terraform init"
terraform init -input=false -no-color

banner "terraform plan"
terraform plan -input=false -no-color -out=tfplan

banner "terraform apply"
terraform apply -input=false -no-color tfplan

banner "outpost demo: done"
