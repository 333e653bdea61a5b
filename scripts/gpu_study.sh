#!/usr/bin/env bash
# The brain MRI sample-efficiency study at full resolution (2 mm) on one GPU, as far as a time limit allows
# (device tool: the wheels of missing packages in .whl/, nilearn's templates in .gpu_site/, the artifact of
# `make pretrain` carried). summary.csv is written after every run, so a cut-off study keeps what finished.
# Usage: bash scripts/gpu_study.sh   (env: LIMIT seconds, SPACING, STEPS, WORKERS, SIZES, VARIANTS, ACCEL)
set -uo pipefail
OUT=${OUT:-results/gpu_study}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  [ -d .gpu_site ] && cp -r .gpu_site/* /tmp/site/
  export PYTHONPATH=/tmp/site
  python3 -m pip install -q --no-deps --no-index --no-build-isolation . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=offline RMR_CACHE=${RMR_CACHE:-/tmp/rmr_cache}
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
STUDY=/tmp/rmr_gpu_study
# the device image lacks wandb: the same config with the CSV logger the study sets anyway
python3 -c "import yaml; c = yaml.safe_load(open('configs/natural/brain_mri.yaml')); c['trainer']['logger'] = False; yaml.safe_dump(c, open('/tmp/brain_mri_base.yaml', 'w'))"
cat > /tmp/gpu_study.yaml <<YAML
base_config: /tmp/brain_mri_base.yaml
output_dir: $STUDY
task: brain_mri_${SPACING:-2}mm
variants: ${VARIANTS:-[rmr, baseline, scratch]}
train_sizes: ${SIZES:-[8, 16, 64]}
seeds: [0, 1, 2]
logger: csv
workers: ${WORKERS:-3}
overrides:
  - --config=configs/trainer/${ACCEL:-gpu}.yaml
  - --data.init_args.spacing=${SPACING:-2}
  - --data.init_args.train_pool=64
  - --trainer.max_steps=${STEPS:-400}
YAML
start=$(date +%s)
# output to a file, not a pipe: worker processes outliving a timed-out parent would hold a pipe open
timeout -k 10 "${LIMIT:-420}" rmr-study --config /tmp/gpu_study.yaml > "$OUT/study.log" 2>&1
pkill -f "multiprocessing.spawn" 2>/dev/null
grep -v -i "warn" "$OUT/study.log" | tail -40
echo "study wall: $(( $(date +%s) - start )) s" | tee -a "$OUT/study.log"
cp "$STUDY"/summary.csv "$STUDY"/summary.md "$STUDY"/sample_efficiency.png "$OUT"/ 2>/dev/null
ls "$OUT"
