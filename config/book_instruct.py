# The whole book in one sitting, step 3 (chapter 7): the pretrained model learns the Alpaca format
# from the book's 1,100 instructions; responses for 20 test entries; no judge (no Ollama needed).
#   python finetune_instruct.py config/book_instruct.py --data=$DATA/instruction-data.json
init_from = 'out-book/pretrain'
out_dir = 'out-book/instruct'
learning_rate = 1e-3
num_epochs = 2
eval_interval = 50
eval_limit = 20
max_new_tokens = 128
judge = 'none'
