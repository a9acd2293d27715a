# GPT-2 124M on FineWeb10B with llm.c's recipe: ~0.5M tokens per step (8 x 64 x 1024), lr 6e-4,
# 700 warmup steps, cosine decay to 0 over ~10B tokens (19,073 steps).
#   python prepare_data.py --dataset=fineweb10B --num_shards=103       # 10.3B tokens, ~21 GB
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_fineweb.py
# On one GPU the same tokens per step come from accumulation (slower, same result):
#   python train.py config/train_gpt2_fineweb.py --batch_size=16 --gradient_accumulation_steps=32
out_dir = 'out-gpt2-fineweb'
data_dir = 'data/fineweb10B'
n_layer, n_head, n_embd = 12, 12, 768
block_size = 1024
bias = True
dropout = 0.0
batch_size = 64
gradient_accumulation_steps = 8  # in total: 8 GPUs x 1, or 1 GPU x 8 (then batch_size 64 needs ~80 GB)
optimizer = 'adamw'  # llm.c's
learning_rate = 6e-4
min_lr = 0.0
warmup_iters = 700
max_iters = 19073
weight_decay = 0.1
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0
eval_interval = 250
eval_iters = 20
log_interval = 10
sample_prompt = 'Hello, I am a language model,'
dtype = 'auto'  # bfloat16 on Ampere and newer
compile = True
