#!/usr/bin/env bash
# The sample-efficiency studies (brain MRI and CT) at full resolution, 2 mm, on one GPU, as far as a time
# limit allows (on a machine without one: ACCEL=cpu WORKERS=2 SMOKE=0, with the project's environment active). For the device tool: wheels of the packages its image lacks in .whl/, nilearn's three MNI152
# templates in .gpu_site/nilearn/datasets/data/, and the artifact of `make pretrain`, all carried.
# The studies run side by side (the small 3D CNNs leave the GPU mostly idle); summary.csv is written after
# every run, so a study cut off by LIMIT keeps what finished, and its table and plot are made from that.
# Usage: bash scripts/gpu_study.sh   (env: TASKS, LIMIT seconds, SPACING, STEPS, WORKERS per task, SIZES,
#                                      VARIANTS, SEEDS, POOL (training pool, default 64), ACCEL, CENTRING=false for region_centring off, GAIN for
#                                      lr_factors.gain (default 10), SMOKE=0 to skip the precision check;
#                                      results in $OUT/results.tgz)
# RESUME=PREFIX continues earlier studies: PREFIX_mri_summary.csv / PREFIX_ct_summary.csv become each study's
# summary.csv, so the runs they hold (same variant, size and seed) are skipped. Resume only with the settings
# they were run with: the H100 2 mm runs in before_region_centring/ predate region centring and the faster gains, so
#   RESUME=docs/measurements/2026-11-27/before_region_centring/gpu_2mm CENTRING=false GAIN=1 SIZES="[16, 64]" VARIANTS="[rmr, baseline]" bash scripts/gpu_study.sh
set -uo pipefail
OUT=${OUT:-results/gpu_study}
WORK=${WORK:-/tmp/rmr_gpu_study}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)  # absolute: the archive is written from inside $WORK
if [ -d .whl ] && ! { command -v rmr-study > /dev/null && python3 -c "import torchio, jsonargparse" 2>/dev/null; }; then  # the device image lacks them
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  [ -d .gpu_site ] && cp -r .gpu_site/* /tmp/site/
  export PYTHONPATH=/tmp/site
  python3 -m pip install -q --no-deps --no-index --no-build-isolation . > "$WORK/install.log" 2>&1 || { cat "$WORK/install.log"; exit 1; }
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=offline RMR_CACHE=${RMR_CACHE:-/tmp/rmr_cache}
if [ "${ACCEL:-gpu}" = cpu ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
  # the studies run side by side: one thread per run they hold at once (2 studies x 1 run x 2 threads each
  # on 2 cores made every 2 mm run 5x slower, 1100 s against 220 s)
  runs=$(( ${WORKERS:-6} * $(echo ${TASKS:-mri ct} | wc -w) ))
  export OMP_NUM_THREADS=$(( $(nproc) / runs > 0 ? $(nproc) / runs : 1 ))
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$WORK/gpu.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 10 > "$WORK/gpu_util.csv" 2>/dev/null &
SMI=$!

base_config() {  # $1: mri or ct. The device image lacks wandb: the task config with its logger off
  mkdir -p "$WORK/$1"
  python3 -c "import yaml, sys; c = yaml.safe_load(open(sys.argv[1])); c['trainer']['logger'] = False; yaml.safe_dump(c, open(sys.argv[2], 'w'))" \
    "configs/natural/brain_$1.yaml" "$WORK/$1/base.yaml"
}

study() {  # $1: mri or ct
  local task=$1 dir="$WORK/$1"
  if [ -n "${RESUME:-}" ] && [ -f "${RESUME}_${task}_summary.csv" ] && [ ! -f "$dir/study/summary.csv" ]; then
    mkdir -p "$dir/study" && cp "${RESUME}_${task}_summary.csv" "$dir/study/summary.csv"
  fi
  cat > "$dir/study.yaml" <<YAML
base_config: $dir/base.yaml
output_dir: $dir/study
task: brain_${task}_${SPACING:-2}mm
variants: ${VARIANTS:-[rmr, baseline, scratch]}
train_sizes: ${SIZES:-[8, 16, 64]}
seeds: ${SEEDS:-[0, 1, 2]}
logger: csv
workers: ${WORKERS:-6}
overrides:
  - --config=configs/trainer/${ACCEL:-gpu}.yaml
  - --data.init_args.spacing=${SPACING:-2}
  - --data.init_args.split.train_pool=${POOL:-64}
  - --data.init_args.loader.num_workers=0
  - --trainer.max_steps=${STEPS:-400}
  - --model.init_args.head.region_centring=${CENTRING:-true}
  - --model.init_args.lr_factors.gain=${GAIN:-10}
$PRECISION
YAML
  local start=$(date +%s)
  # output to a file, not a pipe: worker processes outliving a timed-out parent would hold a pipe open
  # the tag marks rmr-study and its workers (not this script), so the clean-up below kills no one else's
  RMR_STUDY_TAG="gpu_study_$$" timeout -k 10 "${LIMIT:-450}" rmr-study --config "$dir/study.yaml" >> "$dir/study.log" 2>&1  # appended: a resumed study keeps the earlier log
  local rc=$?
  echo "$task study wall: $(( $(date +%s) - start )) s (exit $rc)" | tee -a "$dir/study.log"
}

for task in ${TASKS:-mri ct}; do base_config "$task"; done
# two steps of one natural fit first: a precision that fails here must not cost the whole study
PRECISION=""
first=$(echo ${TASKS:-mri ct} | cut -d' ' -f1)
smoke() { timeout 120 rmr fit --config "$WORK/$first/base.yaml" --config "configs/trainer/${ACCEL:-gpu}.yaml" "$@" \
  --data.init_args.spacing=8 --trainer.fast_dev_run=2 --trainer.default_root_dir="$WORK/smoke" >> "$WORK/smoke.log" 2>&1; }
if [ "${SMOKE:-1}" = 1 ] && ! smoke; then
  grep -E "Error|error" "$WORK/smoke.log" | tail -3
  PRECISION="  - --trainer.precision=32-true"
  smoke --trainer.precision=32-true && echo "bf16-mixed failed, studies run in fp32" || { tail -20 "$WORK/smoke.log"; exit 1; }
fi
start=$(date +%s)
pids=()
for task in ${TASKS:-mri ct}; do study "$task" & pids+=($!); done
wait "${pids[@]}"
# study workers that outlived a timed-out rmr-study (timeout signals its process group; this is the backstop)
for pid in $(grep -lz "^RMR_STUDY_TAG=gpu_study_$$\$" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do kill "$pid" 2>/dev/null; done
kill $SMI 2>/dev/null
echo "all studies: $(( $(date +%s) - start )) s"
for task in ${TASKS:-mri ct}; do  # table and plot from what finished
  python3 - "$WORK/$task/study" <<'PY'
import sys
from pathlib import Path
import pandas as pd
from rmr_lightning.files import atomic_write_text
from rmr_lightning.study import plot, summarise
out = Path(sys.argv[1])
if (out / "summary.csv").is_file():
    frame = pd.read_csv(out / "summary.csv")
    atomic_write_text(out / "summary.md", summarise(frame))
    plot(frame, out / "sample_efficiency.png")
    print(out, f"{len(frame)} runs, median {frame.seconds.median():.0f} s per run")
    print((out / "summary.md").read_text())
PY
  grep -v -i "warn" "$WORK/$task/study.log" | grep -E "test MAE|Error|error|Traceback" | tail -8
done
(cd "$WORK" && tar czf "$OUT/results.tgz" --exclude='*.ckpt' --exclude='*.pt' --exclude='base.yaml' .)
ls -la "$OUT"
