# The whole book in one sitting, step 4 (chapter 7 bonus): DPO on the book's preference pairs,
# starting from the instruction-tuned model; the frozen reference is that same model.
#   python finetune_instruct.py config/book_dpo.py --data=$DATA/instruction-data-with-preference.json
method = 'dpo'
init_from = 'out-book/instruct'
out_dir = 'out-book/dpo'
dpo_learning_rate = 1e-4  # the book's 5e-6 is for gpt2-medium; a small model needs bigger steps
beta = 0.1
num_epochs = 1
eval_interval = 50
eval_limit = 20
max_new_tokens = 128
judge = 'none'
