# nanoGPT's CPU recipe on tiny Shakespeare (its README: 4 layers x 128, context 64, batch 12, 2,000 steps,
# AdamW, val loss ~1.89), beaten to the same loss in a fraction of its time on 2 CPU cores:
#   python prepare_data.py --dataset=shakespeare --data_dir=data/shakespeare_bytes
#   python train.py config/speedrun_shakespeare_cpu.py
# What changed (each measured: RESULTS.md, "The Shakespeare race"): Muon for the blocks' matrices, which
# needs far fewer steps; 3 layers instead of 4 (faster, and as good in this short run); batch 16;
# evaluation at the start and the end only. One token per byte, so the losses compare with nanoGPT's
# characters. float32: at 128 wide bfloat16 is no faster even where native; Muon's Newton-Schulz
# runs in bfloat16 by itself on CPUs that compute it natively (AVX512-BF16/AMX) and float32 elsewhere.
out_dir = 'out-speedrun-shakespeare'
data_dir = 'data/shakespeare_bytes'
sample_prompt = 'ROMEO:'
n_layer, n_head, n_embd = 3, 4, 128
block_size = 64
batch_size = 16
dropout = 0.0
optimizer = 'muon'
muon_lr = 0.02
learning_rate = 2e-3  # AdamW's, for the embeddings, norms and biases
min_lr = 2e-4
weight_decay = 0.1  # half an epoch needs little decay (RESULTS.md, "The Shakespeare race"); the default 0.2 is for its several epochs
warmup_iters = 25
max_iters = 500
eval_interval = 500
eval_iters = 20
log_interval = 100
dtype = 'float32'
