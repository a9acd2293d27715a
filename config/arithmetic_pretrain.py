# The from-scratch GRPO demonstration, step 1 of 3: a small GPT learns addition from 200 worked examples.
#   python prepare_data.py --dataset=arithmetic
#   python train.py config/arithmetic_pretrain.py
#   python finetune_grpo.py config/arithmetic_grpo.py
# The worked set is small and fixed on purpose (the sequel's setting: few worked solutions, many problems
# with checkable answers), so imitating it stops improving on held-out problems; README and RESULTS.md.
out_dir = 'out-arithmetic'
data_dir = 'data/arithmetic'
sample_prompt = '123+459\n'
n_layer, n_head, n_embd = 4, 4, 128
block_size = 64
batch_size = 32
dropout = 0.0
optimizer = 'muon'
muon_lr = 0.02
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 25
max_iters = 600
eval_interval = 200
eval_iters = 10
log_interval = 50
dtype = 'float32'
