# nanoGPT's "baby GPT" on tiny Shakespeare, one token per byte (a character-level model).
#   python prepare_data.py --dataset=shakespeare --data_dir=data/shakespeare_bytes
#   python train.py config/train_shakespeare_char.py
# About 3 minutes on an A100 in nanoGPT (val loss ~1.47); on a CPU try
#   --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --batch_size=12 --max_iters=2000
out_dir = 'out-shakespeare-char'
data_dir = 'data/shakespeare_bytes'
eval_interval = 250
eval_iters = 200
log_interval = 10
sample_prompt = 'ROMEO:'
n_layer, n_head, n_embd = 6, 6, 384
block_size = 256
dropout = 0.2
batch_size = 64
optimizer = 'adamw'  # nanoGPT's
weight_decay = 0.1  # nanoGPT's (our default, 0.2, is tuned for Muon)
learning_rate = 1e-3  # a small model can take a larger step
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99  # few tokens per step: average the squared gradients over more of them
warmup_iters = 100
