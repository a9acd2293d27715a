# The default run (python train.py) with the Llama family's architecture instead of GPT-2's, same size
# class and data: rotary positions, RMSNorm, a SwiGLU MLP (hidden 8/3 x n_embd, so the MLP keeps GPT-2's
# parameter count), grouped-query attention (2 key/value heads for 4 query heads), no biases.
# The head stays tied to the embedding (as Llama 3.2 1B/3B, Qwen3-0.6B and SmolLM2 do).
norm = 'rmsnorm'
pos_emb = 'rope'
rope_theta = 10000.0
mlp = 'swiglu'
mlp_hidden = 344  # ~8/3 * 128, a multiple of 8
n_kv_head = 2
bias = False
out_dir = 'out-llama-style'
