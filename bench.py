"""
Speed measurements (nanoGPT's bench.py idea): generation tokens/s with and without the KV cache,
optionally beside Hugging Face transformers' generate() on the very same weights.
    python bench.py                                  # GPT-2 124M shape, random weights, float32
    python bench.py --dtype=float16 --compare_hf=True
"""
import tempfile
import time

import torch

from configurator import configure, setup, die
from model import GPT, GPTConfig

init_from = 'scratch'  # 'scratch' (random weights in the shape below) or a GPT-2 size / HF-layout folder
n_layer, n_head, n_embd, block_size, vocab_size = 12, 12, 768, 1024, 50257
batch_size = 1
prompt_tokens = 64
max_new_tokens = 200
repeats = 3  # timed runs per variant; the best is reported
device = 'auto'
dtype = 'float32'  # weights are stored in this dtype (float16/bfloat16: half the bytes per token)
seed = 1337
compare_hf = False  # also time transformers' GPT2LMHeadModel.generate (pip install transformers)


def best_time(fn, repeats, sync):
    fn()  # warm-up: allocations, kernels, caches
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times), out


if __name__ == '__main__':
    configure(globals())
    device, device_type, dtype, _ = setup(device, dtype, seed)
    sync = torch.cuda.synchronize if device_type == 'cuda' else (lambda: None)
    if init_from == 'scratch':
        model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size))
    else:
        try:
            model = GPT.from_pretrained(init_from)
        except (OSError, ValueError) as e:
            die(e)
    model.eval().to(device=device, dtype=getattr(torch, dtype))
    cfg = model.config
    idx = torch.randint(0, cfg.vocab_size, (batch_size, prompt_tokens), device=device)
    n_new = batch_size * max_new_tokens
    print(f"{model.get_num_params() / 1e6:.1f}M params, {dtype}, {device}, threads={torch.get_num_threads()}, "
          f"batch {batch_size}, {prompt_tokens}-token prompt, {max_new_tokens} new tokens, greedy")
    rows = []
    with torch.no_grad():
        t_cache, out_cache = best_time(lambda: model.generate(idx, max_new_tokens, temperature=0), repeats, sync)
        rows.append(('ours, KV cache', t_cache))
        t_full, out_full = best_time(lambda: model.generate(idx, max_new_tokens, temperature=0, use_cache=False), repeats, sync)
        rows.append(('ours, no cache (recompute the context)', t_full))
        same = torch.equal(out_cache, out_full)
        if compare_hf:
            try:
                from transformers import GPT2LMHeadModel
            except ImportError:
                die("--compare_hf=True needs transformers: pip install transformers")
            with tempfile.TemporaryDirectory() as tmp:
                model.float().save_pretrained(tmp)
                model.to(dtype=getattr(torch, dtype))
                hf = GPT2LMHeadModel.from_pretrained(tmp).eval().to(device=device, dtype=getattr(torch, dtype))
            mask = torch.ones_like(idx)
            t_hf, out_hf = best_time(lambda: hf.generate(idx, attention_mask=mask, max_new_tokens=max_new_tokens,
                                                         min_new_tokens=max_new_tokens, do_sample=False,
                                                         pad_token_id=0), repeats, sync)
            rows.append(('transformers generate(), its KV cache', t_hf))
    print(f"{'variant':42s} {'tokens/s':>9s} {'ms/token':>9s} {'vs transformers':>16s}")
    for name, t in rows:
        rel = f"{rows[-1][1] / t:.2f}x" if compare_hf else '-'
        print(f"{name:42s} {n_new / t:9.1f} {1e3 * t / max_new_tokens:9.2f} {rel:>16s}")
    print(f"KV cache == no cache: {same}" + (f"; ours == transformers: {torch.equal(out_cache, out_hf)}" if compare_hf else ''))
