#!/usr/bin/env bash
# All GPU checks in one run (device tool): algorithms on CUDA, pretraining on one GPU for <= 5 minutes.
# Usage on the device machine: bash scripts/gpu_check.sh   (writes into $OUT)
set -uo pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if [ -z "${SKIP_INSTALL:-}" ]; then
  python3 -m pip install -q --no-deps --no-index --no-build-isolation . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
python3 -m pytest tests/test_algorithms.py -m gpu -q -p no:cacheprovider 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
ROOT=/tmp/gpu_pretrain
ARGS=(--config configs/pretrain/ndm.yaml --config ${TRAINER:-configs/trainer/gpu.yaml} --config configs/logger/csv.yaml
      --data.init_args.loader.batch_size=256 --trainer.max_steps=${MAX_STEPS:-12000} --trainer.max_time=00:00:04:40
      --trainer.val_check_interval=500 --trainer.enable_progress_bar=false
      --trainer.logger.init_args.save_dir=$ROOT)
python3 -m rmr_lightning.cli fit "${ARGS[@]}" \
  --trainer.callbacks='[{"class_path": "rmr_lightning.callbacks.PretrainingArtifacts", "init_args": {"dirpath": "'$ROOT'"}}, {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": "'$ROOT'/checkpoints", "save_last": true, "save_top_k": 0}}]' \
  > "$OUT/pretrain_fit.log" 2>&1
python3 -m rmr_lightning.cli test "${ARGS[@]}" --ckpt_path "$ROOT/checkpoints/last.ckpt" \
  --trainer.callbacks='[{"class_path": "rmr_lightning.callbacks.PretrainingArtifacts", "init_args": {"dirpath": "'$ROOT'"}}]' \
  > "$OUT/pretrain_test.log" 2>&1
cp "$ROOT"/metrics.json "$ROOT"/val_curve.csv "$ROOT"/fit_stats.json "$OUT"/ 2>/dev/null
tail -5 "$OUT/pretrain_fit.log"; cat "$OUT/metrics.json" "$OUT/val_curve.csv"
