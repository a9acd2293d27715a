# The from-scratch GRPO demonstration, step 3 of 3 (after prepare_data.py --dataset=arithmetic and
# train.py config/arithmetic_pretrain.py): reinforcement learning on problems with final answers only,
# from the small pretrained model; held-out accuracy before and after (README, RESULTS.md).
init_from = 'out-arithmetic'
out_dir = 'out-arithmetic-grpo'
data = 'data/arithmetic/answers.json'  # GRPO's prompts and the verifier's answers: no worked steps
test_data = 'data/arithmetic/test.json'  # operands never seen in training
verifier = 'exact'  # the completion's last line must be the sum
problem_prompt = 'plain'  # as a document of the pretraining text opens
batch_size = 32
group_size = 8
max_new_tokens = 40
temperature = 1.0
learning_rate = 3e-5  # pretraining's AdamW lr was 2e-3: 10x less already collapsed (RESULTS.md)
weight_decay = 0.0
max_iters = 300
eval_interval = 100
sc_k = 8
gen_batch_size = 64
dtype = 'float32'
device = 'cpu'
