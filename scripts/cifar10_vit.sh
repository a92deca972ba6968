#!/usr/bin/env bash
# CIFAR-10 (or CIFAR-100) python pickles on disk -> WebDataset shards -> ViT trained from scratch, one command:
#   bash scripts/cifar10_vit.sh /data/cifar-10-batches-py [hydra overrides ...]
#   bash scripts/cifar10_vit.sh /data/cifar-100-python                       # data=cifar100, 100 classes
# Shards go to $CIFAR_WORK/shards (default: cifar_work/ in the repository; a rerun reuses finished shards)
# and are verified; then +experiment=cifar10_vit trains into $CIFAR_WORK/<data>_vit on those shards.
# NPROC ranks (default: the GPUs nvidia-smi lists, else 1): more than one goes through the DeepSpeed launcher.
# MLflow: tracking as in the README (sqlite:///mlflow.db in the working directory unless MLFLOW_TRACKING_URI).
set -euo pipefail
SRC=${1:?usage: scripts/cifar10_vit.sh CIFAR_DIR [hydra overrides ...]}
shift
SRC=$(cd "$SRC" && pwd)
WORK=${CIFAR_WORK:-$(cd "$(dirname "$0")/.." && pwd)/cifar_work}
[[ "$WORK" = /* ]] || WORK="$PWD/$WORK"  # a relative CIFAR_WORK is relative to where you are
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [[ "$NPROC" -ge 1 ]] || NPROC=1
fi
if [[ -f "$SRC/batches.meta" ]]; then DATA=cifar10; elif [[ -f "$SRC/meta" ]]; then DATA=cifar100
else echo "error: $SRC is not cifar-10-batches-py/ (batches.meta) or cifar-100-python/ (meta)" >&2; exit 2; fi

# Both splits, verified: 1000 images a train shard (50 to draw from), 250 a test shard (40: enough eval
# readers for 8 ranks x 4 workers); the test split keeps its order.
$PY -m data_tools.cifar --src "$SRC" --out "$WORK/shards" --workers "${SHARD_WORKERS:-2}"
pattern() {  # the brace pattern manifest.json gives for the shard folder's only split
  $PY -c "import json,sys; s=json.load(open(sys.argv[1]+'/manifest.json'))['splits']; print(sys.argv[1]+'/'+next(iter(s.values()))['pattern'])" "$1"
}
TRAIN=$(pattern "$WORK/shards/$DATA-train")
TEST=$(pattern "$WORK/shards/$DATA-test")
echo "train shards: $TRAIN   test shards: $TEST   ranks: $NPROC"

ARGS=(+experiment=cifar10_vit "data=$DATA" "data.train_shards='$TRAIN'" "data.val_shards='$TEST'"
      "name=${DATA}_vit" "output_dir=$WORK/${DATA}_vit" "tracking.register_name=vit-$DATA" "$@")
if [[ "$NPROC" -gt 1 ]]; then
  exec "$(dirname "$PY")/deepspeed" --num_gpus "$NPROC" vitscale/train.py "${ARGS[@]}"
fi
exec "$PY" vitscale/train.py "${ARGS[@]}"
