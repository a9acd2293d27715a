# The whole book in one sitting, step 1 (chapter 5): pretrain a small byte-level GPT on the English
# text of Python's documentation (ships with Python: nothing to download), context 512 so that the
# later steps' instructions fit. About 7 minutes on 2 CPU cores.
#   python train.py config/book_pretrain.py
out_dir = 'out-book/pretrain'
data_dir = 'data/pydoc'
n_layer, n_head, n_embd = 4, 4, 128
block_size = 512
batch_size = 8
max_iters = 2000
warmup_iters = 100
optimizer = 'adamw'  # chapter 5's (train.py's default run uses Muon)
learning_rate = 2e-3
min_lr = 2e-4
eval_interval = 500
eval_iters = 10
log_interval = 100
sample_prompt = 'The '
