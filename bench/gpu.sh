#!/usr/bin/env bash
# The README's GPU figures in one pass (about 8 minutes on one H200): SD 1.5's shapes at full size
# (512 px, random weights, built here), bfloat16 frozen weights with the float32 LoRA.
#
#   bash bench/gpu.sh runs/bench-gpu          # needs a CUDA torch and the project's packages
#
# Each step has its own time limit, so one that hangs or runs out of memory leaves the others' figures.
# SAMPLE_SIZE, STEPS, BATCH, REPEATS and DEMO_OVERRIDES shrink the work for a dry run on a CPU (DEVICE=cpu);
# DEMO_SEEDS="0 1 2" trains the demo for three seeds side by side.
set -u
out=${1:-runs/bench-gpu}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
model=${SD15_DIR:-/tmp/sd15-shaped}
sample_size=${SAMPLE_SIZE:-64}  # latent side: 64 is SD 1.5's 512 px
steps=${STEPS:-50}
batch=${BATCH:-8}
repeats=${REPEATS:-5}
device=${DEVICE:-cuda}
log="$out/gpu.log"

step() {  # step NAME SECONDS COMMAND...: run with a limit, log it, never stop the pass
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" | tee -a "$log"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v "requires torchvision\|Install torchvision" | tee -a "$log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$log"
}

step environment 120 "$python" -c "
import torch, diffusers, transformers, peft
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__,
      'transformers', transformers.__version__, 'peft', peft.__version__)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB')"
[ -f "$model/model_index.json" ] || step build 240 "$python" bench/sd15_shaped.py "$model" --sample-size "$sample_size"
step sampler 150 "$python" bench/sampler_overhead.py "$model" --dtype bfloat16 --batch "$batch" --steps "$steps" \
  --repeats "$repeats" --out "$out/sampler_overhead.json"
step learner 200 "$python" bench/learner_overhead.py "$model" --batch $((batch / 2)) --repeats "$repeats" \
  --out "$out/learner_overhead.json" model.dtype=bfloat16 "sample.num_steps=$steps" train.min_sigma=0  # every step
step half_precision 200 "$python" bench/half_precision_gradients.py "$model" --device "$device" \
  --size $((sample_size * 8)) --num-steps "$steps" --trained $((steps / 2))
# PPO's log-ratio after one step in bfloat16 and float16 against float32, at SD 1.5's shapes (docs/half_precision.md)
step ppo_ratio 200 "$python" bench/ppo_ratio_precision.py --size $((sample_size * 8)) --rows 4 --clip-ranges 1e-4 1e-2 \
  --out "$out/ppo_ratio_precision.json" "model.pretrained=$model" "model.device=$device" train.warmup_steps=0 \
  train.learning_rate=3e-4 train.min_sigma=0 sample.num_steps=10
# the demo (configs/tiny.yaml: toy model, 20 epochs, 1920 held-out images before and after), one process per seed
# of DEMO_SEEDS (default 0), side by side on the one GPU; each one's held-out gain goes to the log
demo_seeds=${DEMO_SEEDS:-0}
demo_runs=""
for seed in $demo_seeds; do
  demo_runs+="'$python' -m rl.cli train --config configs/tiny.yaml resources.mode=inline model.device=$device \
    model.dtype=bfloat16 seed=$seed run_name=demo_seed$seed output_dir=/tmp/gpu-runs ${DEMO_OVERRIDES:-} \
    > '$out/demo_seed$seed.log' 2>&1 & "
done
step demo 300 bash -c "$demo_runs wait"  # timeout signals the whole group: the runs too
for seed in $demo_seeds; do
  mkdir -p "$out/demo_seed$seed"
  cp /tmp/gpu-runs/demo_seed$seed/{reward_curve.png,metrics.parquet,evaluation.parquet} "$out/demo_seed$seed/" 2>/dev/null
  echo "== demo seed $seed:" | tee -a "$log"
  grep -E "^(mean reward|held-out)" "$out/demo_seed$seed.log" | tee -a "$log"
  # the learner against the sampler on the GPU, latents stored in float16 (docs/half_precision.md): ~0 expected
  "$python" -c "import pyarrow.parquet as pq; m = pq.read_table('$out/demo_seed$seed/metrics.parquet').column('logprob_mismatch')
print('largest logprob_mismatch over the epochs:', max(m.to_pylist()))" 2>&1 | tee -a "$log"
done
step draft_memory 240 "$python" bench/gradient_memory.py "$model" --dtype bfloat16 --size $((sample_size * 8)) \
  --steps "$steps" --ks 1,5,all --no-checkpointing
