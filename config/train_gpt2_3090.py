# GPT-2 small trained at home: one 24 GB consumer GPU (RTX 3090/4090), 20 tokens per parameter of
# FineWeb, with the interventions one reader measured on his own from-scratch GPT-2 (RESULTS.md,
# "Interventions") stacked: gradient clipping, biases on q/k/v (GPT-2 has them), no dropout, an
# untied output head (tying measured worse), peak lr 1.4e-3 with 5% warmup and cosine decay to
# 0.1x, weight decay 0.01. His run: 163M parameters, 3.26B tokens, ~48 hours on one 3090.
#   python prepare_data.py --dataset=fineweb10B --num_shards=33     # 3.3B tokens, ~7 GB
#   python train.py config/train_gpt2_3090.py
# Tokens: 163M parameters (124M + an untied 38.6M head) x 20 = 3.26B = 6,220 steps of 524,288.
# Time, from our measured throughput: 6N + 12LTd = 1.09 GFLOP per token, 3.6e18 in all; train.py
# ran this config at 47.5% MFU on an H200 (RESULTS.md, "The first GPU run"), and at that MFU a 3090
# (71 TFLOP/s bf16) takes 3.6e18 / (71e12 x 0.475) = ~30 h. train.py prints its MFU from the first
# log line: 3.6e18 / (71e12 x MFU) seconds is your own figure.
out_dir = 'out-gpt2-3090'
data_dir = 'data/fineweb10B'
n_layer, n_head, n_embd = 12, 12, 768
block_size = 1024
bias = True  # GPT-2's biases, q/k/v's included (qkv bias: one of his gains)
tie_embeddings = False
dropout = 0.0
batch_size = 8  # a micro-batch that fits 24 GB with the untied 50,304-row head's logits
gradient_accumulation_steps = 64  # 8 x 1024 x 64 = 524,288 tokens per step
max_iters = 6220
optimizer = 'adamw'  # his
learning_rate = 1.4e-3
warmup_iters = 311  # 5%
min_lr = 1.4e-4  # 0.1x
weight_decay = 0.01
grad_clip = 1.0
eval_interval = 250
eval_iters = 20
eval_hellaswag = True
log_interval = 10
sample_prompt = 'Hello, I am a language model,'
dtype = 'auto'  # bfloat16 on Ampere and newer; TF32 for the float32 matmuls is on by default (configurator.setup)
compile = True
