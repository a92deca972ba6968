#!/usr/bin/env bash
# End-to-end demo on real data (Fashion-MNIST, 60k train / 10k test, 28x28 grey, 10 classes):
# shard -> pre-train (DeepSpeed ZeRO-2, 2 CPU ranks) -> register in MLflow -> fine-tune at higher resolution
# from models:/NAME@latest -> evaluate on the test split (logged as test_top1 on the fine-tune run).
# Called by `make demo` after `make setup fmnist`. Everything lands in demo_work/ (DEMO_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DS=.venv/bin/deepspeed
FM=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
WORK=${DEMO_DIR:-demo_work}
NPROC=${DEMO_NPROC:-2}
NAMES="T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot"
mkdir -p "$WORK"
WORK_ABS=$(cd "$WORK" && pwd)  # DEMO_DIR may be relative or absolute
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$WORK_ABS/mlflow.db}
export MLFLOW_DISABLE_TELEMETRY=true DS_ACCELERATOR=cpu MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
PRE_NAME=vit-demo-fmnist
FT_NAME=vit-demo-fmnist-ft40
start=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - start ))s] $*"; }

stamp "1/5 shard Fashion-MNIST with data_tools (resumable: a rerun reuses finished shards)"
$PY -m data_tools.shard --src "$FM/train-images-idx3-ubyte.gz" --out "$WORK/shards/train" \
    --prefix fmnist-train --class-names "$NAMES" --samples-per-shard 5000 --workers 2
$PY -m data_tools.shard --src "$FM/t10k-images-idx3-ubyte.gz" --out "$WORK/shards/test" \
    --prefix fmnist-test --class-names "$NAMES" --samples-per-shard 2500 --no-shuffle
pattern() {  # the brace pattern manifest.json gives for the shard folder's only split
  $PY -c "import json,sys; s=json.load(open(sys.argv[1]+'/manifest.json'))['splits']; print(sys.argv[1]+'/'+next(iter(s.values()))['pattern'])" "$1"
}
TRAIN=$(pattern "$WORK/shards/train")
TEST=$(pattern "$WORK/shards/test")
$PY -m data_tools.verify "$WORK/shards/train" >/dev/null && $PY -m data_tools.verify "$WORK/shards/test" >/dev/null
stamp "train shards: $TRAIN   test shards: $TEST"

rm -rf "$WORK/pretrain" "$WORK/finetune"   # a demo run starts fresh; the registry keeps every version
stamp "2/5 pre-train a hybrid ViT (32 px, 8 px tokens: 4 x 4 grid) with DeepSpeed ZeRO-2 on $NPROC CPU ranks; registers $PRE_NAME"
$DS --log_level warning --num_gpus "$NPROC" vitscale/train.py +experiment=demo_pretrain \
    data.train_shards="'$TRAIN'" data.val_shards="'$TEST'" output_dir="$WORK/pretrain" \
    tracking.register_name=$PRE_NAME

stamp "3/5 fine-tune from models:/$PRE_NAME@latest at 40 px (5 x 5 grid; position embeddings resampled, new zero head)"
$DS --log_level warning --num_gpus "$NPROC" vitscale/train.py +experiment=demo_finetune \
    finetune.source="models:/$PRE_NAME@latest" \
    data.train_shards="'$TRAIN'" data.val_shards="'$TEST'" output_dir="$WORK/finetune" \
    tracking.register_name=$FT_NAME

stamp "4/5 evaluate the registered fine-tuned model on the 10k test images"
FT_RUN=$($PY - <<PYEOF
from mlflow import MlflowClient
versions = MlflowClient().search_model_versions("name='$FT_NAME'")
print(max(versions, key=lambda v: int(v.version)).run_id)
PYEOF
)
$PY -m vitscale.evaluate --weights "models:/$FT_NAME@latest" --val-shards "$TEST" --topk \
    --prefix test_ --run-id "$FT_RUN" --json "$WORK/test_metrics.json"

stamp "5/5 done"
$PY - "$WORK/test_metrics.json" "$FT_RUN" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[1]))
top1 = m.get("test_top1", m.get("top1"))
print(f"\nFashion-MNIST test top-1: {100 * top1:.2f} %  (metric test_top1={top1:.4f} on MLflow run {sys.argv[2]})")
PYEOF
# The store, the `export` line that points later commands (vitscale.evaluate, vitscale.figures, mlflow) at
# it, the UI command and the runs-list URL (?workflowType=machine_learning: MLflow 3.17 otherwise opens the
# empty GenAI Traces view).
echo
$PY -m vitscale.tracking.where --experiment vitscale
