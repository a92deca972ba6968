#!/usr/bin/env bash
# `make docs-check`: run the README's "right after make demo" block, in order, as a user would paste it,
# on the demo's outputs (demo_work/). Every command must exit 0. The block sits between the
# <!-- docs-check:begin --> and <!-- docs-check:end --> markers in README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f demo_work/mlflow.db ] || { echo "docs-check: demo_work/mlflow.db missing: run 'make demo' first"; exit 2; }
block=$(awk '/<!-- docs-check:begin -->/{on=1; next} /<!-- docs-check:end -->/{on=0} on' README.md | sed '/^```/d')
[ -n "$block" ] || { echo "docs-check: no docs-check block in README.md"; exit 2; }
echo "$block" > demo_work/docs_check.sh
export DS_ACCELERATOR=cpu MLFLOW_DISABLE_TELEMETRY=true
bash -euxo pipefail demo_work/docs_check.sh
echo "docs-check: every README command ran (demo_work/docs_check.sh)"
