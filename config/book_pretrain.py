# The whole book in one sitting, step 1 (chapter 5): pretrain a small byte-level GPT on the English
# text of Python's documentation (ships with Python: nothing to download), context 512 so that the
# later steps' instructions fit. About 9 minutes on 2 CPU cores (RESULTS.md, "The whole-book block").
#   python train.py config/book_pretrain.py
out_dir = 'out-book/pretrain'
data_dir = 'data/pydoc'
n_layer, n_head, n_embd = 4, 4, 128
block_size = 512
batch_size = 8
max_iters = 2000
warmup_iters = 100  # then Muon, lr 4e-3 and cosine as train.py's default run (chapter 5's AdamW: --optimizer=adamw)
eval_interval = 500
eval_iters = 10
log_interval = 100
sample_prompt = 'The '
