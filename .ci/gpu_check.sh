#!/usr/bin/env bash
# The GPU run of issue 30: ../shared/gpu/gpu_check.sh with its rows (every figure RESULTS.md's "The second GPU
# run" lists), the training row before the generation rows. From the checkout's root:
#   mkdir -p .gpu/data && cp -r ../shared/gpu/. .gpu/ && cp .ci/gpu_check.sh .gpu/ && echo /.gpu/ >> .git/info/exclude
#   cp ../shared/data/tinyshakespeare.txt ../shared/data/SMSSpamCollection .gpu/data/   (../shared does not travel)
#   device tool: "PART=speed bash .gpu/gpu_check.sh" (~8 min on an H200), then "PART=correct ..." (~3 min), carry [".gpu"]
# DEV=cpu SMALL=1 bash .gpu/gpu_check.sh rehearses it on tiny shapes (~8 min on 2 cores; the generation rows need
# transformers); then rm -rf .gpu/work .gpu/out: only 64 MiB travel. Logs go to $OUT, never through a pipe.
set -u
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR=$PWD/.gpu/tiktoken_cache
GPU=$PWD/.gpu; DATA=$GPU/data; [ -f $DATA/tinyshakespeare.txt ] || DATA=$PWD/../shared/data
OUT=${OUT:-$GPU/out}; mkdir -p $OUT
DEV=${DEV:-cuda}; SMALL=${SMALL:-0}
PART=${PART:-all}  # speed (about 6 min on an H200), correct (about 4 min), or all: two runs fit the 10-minute limit better than one
L=$OUT/log.txt; : > $L
PY=python3
T0=$(date +%s)
step() {  # step NAME TIMEOUT cmd...
  local name=$1 t=$2; shift 2
  echo "=== $name (+$(( $(date +%s) - T0 )) s)" >> $L
  timeout $t "$@" >> $L 2>&1; local rc=$?
  echo "=== rc=$rc $name (+$(( $(date +%s) - T0 )) s)" >> $L
}
if [ $SMALL = 1 ]; then
  BIG="--n_layer=2 --n_head=2 --n_embd=64 --block_size=64"; NB="--n_layer=2 --n_head=2 --n_embd=64 --block_size=64"
  RANDN=200000; STEPS=3; GEN="--max_new_tokens=8 --n_layer=2 --n_head=2 --n_embd=64 --prompt_tokens=8"
  SMALLM="--n_layer=2 --n_head=2 --n_embd=64"
else
  BIG=""; NB=""; RANDN=20000000; STEPS=20; GEN=""; SMALLM="--n_layer=6 --n_head=6 --n_embd=384"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1; lscpu | grep "Model name";
  $PY -c "import torch, transformers, tiktoken; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"; } >> $L 2>&1
W=$GPU/work; mkdir -p $W
$PY - <<PY >> $L 2>&1
import numpy as np, os
os.makedirs('$W/rand', exist_ok=True)
rng = np.random.default_rng(0)
for split, n in (('train', $RANDN), ('val', 200000)):
    h = np.zeros(256, np.int32); h[:3] = (20240520, 1, n)
    with open(f'$W/rand/rand_{split}_000000.bin', 'wb') as f:
        f.write(h.tobytes()); f.write(rng.integers(0, 50257, n, dtype=np.uint16).tobytes())
print('random GPT-2 shards written')
PY
if [ $PART != correct ]; then
# ---- performance: bench against bench, the GPT-2 124M shape, batch 12 x 1024, bf16, compiled (then 3 profiled steps)
step bench-ours-adamw 180 $PY bench.py --device=$DEV --compile=True --batch_size=12 --steps=$STEPS --warmup_steps=5 --profile=True $BIG
if [ $DEV = cuda ]; then  # nanoGPT's bench.py calls torch.cuda.synchronize(): GPU only
  ( cd $GPU/nanogpt && step bench-nanogpt 180 $PY bench.py --device=$DEV --real_data=False --bias=True --batch_size=12 )
else echo "=== bench-nanogpt skipped: it needs CUDA" >> $L; fi
step bench-ours-adamw-b24 150 $PY bench.py --device=$DEV --compile=True --batch_size=24 --steps=$STEPS --warmup_steps=5 $BIG
step bench-ours-muon 150 $PY bench.py --device=$DEV --compile=True --batch_size=12 --steps=$STEPS --warmup_steps=5 --optimizer=muon $BIG
step optimizer 120 $PY bench.py --device=$DEV --mode=optimizer $BIG
# ---- the 3090 recipe's throughput through train.py: 20 steps of accumulation 4 on random GPT-2 tokens
step train-3090 200 $PY train.py config/train_gpt2_3090.py --device=$DEV --data_dir=$W/rand --out_dir=$W/out-3090 \
    --max_iters=20 --gradient_accumulation_steps=4 --eval_interval=20 --eval_iters=2 --eval_hellaswag=False --log_interval=5 $NB
# ---- generation, bf16: ours eager and compiled against transformers eager and static-cache compiled
step gen-qwen3 240 $PY bench.py --device=$DEV --mode=generate --shape=qwen3-0.6b --dtype=bfloat16 --batch_size=1 \
    --prompt_tokens=16 --max_new_tokens=128 --repeats=2 --uncached=False --compile=True --compare_hf=True
step gen-gpt2-b8 180 $PY bench.py --device=$DEV --mode=generate --dtype=bfloat16 --batch_size=8 --compile=True --compare_hf=True --repeats=2 $GEN
if grep -q "quantize" bench.py; then
  step gen-qwen3-int8 240 $PY bench.py --device=$DEV --mode=generate --shape=qwen3-0.6b --dtype=bfloat16 --batch_size=1 \
      --prompt_tokens=16 --max_new_tokens=128 --repeats=2 --uncached=False --compile=True --quantize=int8
fi
fi
if [ $PART != speed ]; then
# ---- correctness on CUDA, in three parallel groups of small models, each with its own log
$PY prepare_data.py --dataset=shakespeare --raw_dir=$DATA --data_dir=$W/shk >> $L 2>&1
C="--device=$DEV --data_dir=$W/shk --eval_iters=5 --log_interval=10 $SMALLM --block_size=256 --batch_size=16 --lr_decay_iters=60 --dropout=0.1"
(
  L=$OUT/log_resume.txt; : > $L
  step straight-60 150 $PY train.py $C --out_dir=$W/o-straight --max_iters=60 --eval_interval=30 --compile=True --dtype=bfloat16
  step first-30 150 $PY train.py $C --out_dir=$W/o-half --max_iters=30 --eval_interval=30 --compile=True --dtype=bfloat16
  step resume-to-60 150 $PY train.py $C --out_dir=$W/o-half --max_iters=60 --eval_interval=30 --compile=True --dtype=bfloat16 --init_from=resume --seed=7
  step compare 60 $PY -c "
import torch
import model, weights
load_checkpoint = getattr(weights, 'load_checkpoint', None) or model.load_checkpoint
a, b = load_checkpoint('$W/o-straight'), load_checkpoint('$W/o-half')
d = max((a['model'][k].float() - b['model'][k].float()).abs().max().item() for k in a['model'])
print('resume on', '$DEV', 'bf16 compiled: max |w_straight - w_resumed| =', d, 'iters', a['iter_num'], b['iter_num'])"
) &
(
  L=$OUT/log_fp16.txt; : > $L
  step f32-a 100 $PY train.py $C --out_dir=$W/o-f32 --max_iters=30 --eval_interval=15 --dtype=float32 --optimizer=adamw
  step f32-resume-as-fp16 100 $PY train.py $C --out_dir=$W/o-f32 --init_from=resume --max_iters=45 --eval_interval=15 --dtype=float16 --optimizer=adamw
  step sample 60 $PY sample.py --device=$DEV --out_dir=$W/o-f32 --num_samples=1 --max_new_tokens=40
  step classify 150 $PY finetune_classify.py config/book_classify.py --device=$DEV --init_from=$W/o-f32 \
      --data=$DATA/SMSSpamCollection --out_dir=$W/o-cls --num_epochs=1 --max_length=128
) &
(
  L=$OUT/log_dist.txt; : > $L
  step ddp-1 120 torchrun --standalone --nproc_per_node=1 train.py $C --out_dir=$W/o-ddp --max_iters=20 --eval_interval=20 --compile=True
  TORCH_LOGS=recompiles step fsdp-1 150 torchrun --standalone --nproc_per_node=1 train.py $C --out_dir=$W/o-fsdp --max_iters=20 \
      --eval_interval=10 --ddp=fsdp --optimizer=adamw --compile=True --dtype=bfloat16
  echo "fsdp-1 recompiles logged: $(grep -c 'Recompiling' $L)" >> $L
  step two-procs-one-gpu 60 torchrun --standalone --nproc_per_node=2 train.py $C --out_dir=$W/o-2p --max_iters=5 --gradient_accumulation_steps=2
  step llama-compiled 150 $PY train.py config/train_llama_style.py --device=$DEV --out_dir=$W/o-llama --max_iters=30 \
      --eval_interval=30 --compile=True --eval_iters=5
) &
wait
fi
echo "=== done (+$(( $(date +%s) - T0 )) s)" >> $L
