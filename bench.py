"""
Speed measurements (nanoGPT's bench.py idea; the book's ch05 "speed-up" bonus as a table).
    python bench.py                                  # training steps, GPT-2 124M shape, synthetic tokens
    python bench.py --ablate=True                    # the book's speed-ups one at a time
    python bench.py --mode=generate --compare_hf=True --dtype=float16   # generation tokens/s
    python bench.py --mode=generate --shape=qwen3-0.6b --dtype=bfloat16 --batch_size=1 --compare_hf=True
    python bench.py --mode=generate --shape=qwen3-0.6b --batch_size=1 --quantize=int8   # int8 beside bf16
    python bench.py --mode=generate --shape=qwen3-0.6b --batch_size=1 --prompt_tokens=1 --max_new_tokens=64 \
        --quantize=int8,int4 --compile=True --llamacpp=PATH/llama-bench      # beside llama.cpp, the same weights
    python bench.py --mode=optimizer                 # one optimizer step alone, GPT-2 124M: fused AdamW vs Muon
"""
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from configurator import configure, setup, die, maybe_compile, synchronize, gpu_peak_flops, compile_decoding
from model import FUSED_ADAMW_DEVICES, GPT, GPTConfig
from quantize import cast_and_quantize, talk_dtype
from weights import empty_model, load_pretrained, save_pretrained
from tokenizer import get_tokenizer, tokenizer_json
from prepare_data import find_shards, read_shard

mode = 'train'  # train (ms/step, tokens/s, MFU, memory), generate (tokens/s with and without the KV cache) or optimizer
init_from = 'scratch'  # 'scratch' (random weights in the shape below) or a GPT-2 size / HF-layout folder
shape = ''  # generate: a published model's shape with random weights instead (qwen3-0.6b, gemma-3-270m, ...)
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
vocab_size = 50257
pad_vocab = 64  # train: embedding/head rows up to a multiple of this, as train.py (1 = none)
batch_size = 8  # train: sequences per step; generate: prompts at once
data_dir = ''  # train: shards to read batches from; '' = synthetic random tokens
warmup_steps = 3  # train: untimed steps first (allocations, kernels, compilation)
steps = 10  # train: timed steps
optimizer = 'adamw'  # adamw or muon
grad_checkpoint = False
compile = False  # train: the compiled model; generate: also time the compiled one-token step
ablate = False  # train: walk the book's speed-ups one at a time and print the table
profile = False  # train: 3 more steps under torch.profiler (table and trace); generate: each model's costliest ops
prompt_tokens = 64  # generate
max_new_tokens = 200  # generate
repeats = 3  # generate: timed rounds, each running every variant once in turn; the medians are reported
uncached = True  # generate: also time generation without the KV cache (slow for big shapes)
compare_hf = False  # generate: also time transformers' generate() on the same weights (pip install transformers)
quantize = 'none'  # generate: int8, int4 or int8,int4 = also time weight-only copies (quantize.py) in the same rounds
bandwidth_mb = 1024  # generate: MB of the buffer whose plain read measures memory bandwidth (0 = skip)
llamacpp = ''  # generate: PATH/llama-bench = also time llama.cpp on GGUFs of the same weights (F16, Q8_0, Q4_0)
device = 'auto'
dtype = 'auto'  # train: autocast dtype; generate: the dtype the weights are stored in
seed = 1337


# -------------------------------------------------------------------- the book's slower building blocks

class BookLayerNorm(nn.Module):  # ch04's LayerNorm, written out
    def __init__(self, ln):
        super().__init__()
        self.eps, self.scale = 1e-5, nn.Parameter(ln.weight.detach().clone())
        self.shift = nn.Parameter(ln.bias.detach().clone()) if ln.bias is not None else None

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        x = self.scale * (x - mean) / torch.sqrt(var + self.eps)
        return x + self.shift if self.shift is not None else x


class BookGELU(nn.Module):  # ch04's GELU, the tanh approximation written out
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def manual_attention(self, x, rope=None, kv_cache=None, mask=None, slot=None):  # ch03's attention, written out
    B, T, C = x.size()
    q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float('-inf'))
    y = att.softmax(dim=-1) @ v
    return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


def use_book_blocks(model, norms, attention):
    """Swap in the book's hand-written LayerNorm/GELU and/or attention (same weights)."""
    for block in model.transformer.h:
        if norms:
            block.ln_1, block.ln_2, block.mlp.gelu = BookLayerNorm(block.ln_1), BookLayerNorm(block.ln_2), BookGELU()
        if attention:
            block.attn.forward = types.MethodType(manual_attention, block.attn)
    if norms:
        model.transformer.ln_f = BookLayerNorm(model.transformer.ln_f)


# -------------------------------------------------------------------- training speed

def train_speed(dev, device_type, bs, pad, tf32, fused, pin, native_norms, sdpa, compiled, dtype_name, profiled=False):
    """ms/step, tokens/s, MFU and peak memory of `steps` optimizer steps after `warmup_steps`; profiled:
    then 3 more steps under torch.profiler, its table of the costliest kernels printed and its trace written."""
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size,
                          padded_vocab_size=math.ceil(vocab_size / pad) * pad))
    use_book_blocks(model, norms=not native_norms, attention=not sdpa)
    model.grad_checkpoint = grad_checkpoint
    model.to(dev)
    if optimizer == 'adamw':  # fused: one kernel for every tensor; foreach=False: the slowest, per-tensor loop
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None, foreach=None if fused else False)
    else:
        opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device_type, optimizer)
    fwd = maybe_compile(model, compiled, device_type)
    ctx = torch.autocast(device_type, dtype=getattr(torch, dtype_name), enabled=dtype_name != 'float32')
    shards = [read_shard(p) for p in find_shards(data_dir, 'train')] if data_dir else None
    gen = torch.Generator().manual_seed(seed)

    def batch():
        if shards:
            s = shards[0]
            starts = torch.randint(len(s) - block_size - 1, (bs,), generator=gen).tolist()
            xy = torch.from_numpy(np.stack([s[i:i + block_size + 1] for i in starts]).astype(np.int64))
        else:
            xy = torch.randint(0, vocab_size, (bs, block_size + 1), generator=gen)
        xy = (xy.pin_memory() if pin else xy).to(dev, non_blocking=pin)
        return xy[:, :-1], xy[:, 1:]

    def step():
        x, y = batch()
        with ctx:
            _, loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device_type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup_steps + steps):
        if i == warmup_steps:
            synchronize(device_type)
            t0 = time.perf_counter()
        step()
    synchronize(device_type)
    dt = (time.perf_counter() - t0) / steps
    if profiled:  # after the timed steps, so that the profiler's own cost is not in the figures
        with torch.profiler.profile(on_trace_ready=torch.profiler.tensorboard_trace_handler('bench_trace')) as prof:
            for _ in range(3):
                step()
            synchronize(device_type)
        where = 'device' if device_type == 'cuda' else 'cpu'
        print(prof.key_averages().table(sort_by=f'self_{where}_time_total', row_limit=30, max_name_column_width=60))
    tok_s = bs * block_size / dt
    peak = gpu_peak_flops(dev, dtype_name) if tf32 or dtype_name != 'float32' else None  # plain FP32: no peak listed
    return dt * 1000, tok_s, model.estimate_mfu(tok_s, peak), peak_memory(device_type)


def optimizer_speed(dev, device_type, dtype_name):
    """ms per optimizer step alone (random gradients): fused AdamW and Muon on the same model, in alternation,
    medians. Muon's Newton-Schulz in bfloat16 where that is the dtype (as train.py picks it), else float32."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size,
                          padded_vocab_size=math.ceil(vocab_size / pad_vocab) * pad_vocab)).to(dev)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    ns_dtype = torch.bfloat16 if dtype_name == 'bfloat16' else torch.float32
    opts = {name: model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device_type, name, muon_dtype=ns_dtype)
            for name in ('adamw', 'muon')}
    seconds, _, _ = time_interleaved({name: opt.step for name, opt in opts.items()}, device_type, warmup_steps, steps)
    ms = {name: 1000 * t for name, t in seconds.items()}
    print(f"optimizer step alone, GPT {n_layer}x{n_embd} ({model.get_num_params() / 1e6:.1f}M params), {dev}, "
          f"threads={torch.get_num_threads()}, Muon's Newton-Schulz in {str(ns_dtype)[6:]}, median of {steps}")
    print(f"adamw {ms['adamw']:.2f} ms/step | muon {ms['muon']:.2f} ms/step ({ms['muon'] / ms['adamw']:.2f}x)")


def peak_memory(device_type):
    """Peak bytes: of the GPU's allocator, or of the whole process on CPU (None where unknown)."""
    if device_type == 'cuda':
        return torch.cuda.max_memory_allocated()
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == 'darwin' else rss * 1024  # macOS counts bytes, Linux KiB


LLAMA = dict(norm='rmsnorm', pos_emb='rope', mlp='swiglu', bias=False)
SHAPES = {  # the published configs (random weights here): what a token costs at their real size
    'qwen3-0.6b': GPTConfig(vocab_size=151936, block_size=40960, n_layer=28, n_head=16, n_kv_head=8, head_dim=128,
                            n_embd=1024, mlp_hidden=3072, qk_norm=True, norm_eps=1e-6, rope_theta=1e6, **LLAMA),
    'llama-3.2-1b': GPTConfig(vocab_size=128256, block_size=131072, n_layer=16, n_head=32, n_kv_head=8, head_dim=64,
                              n_embd=2048, mlp_hidden=8192, rope_theta=500000.0, rope_scaling=dict(
                                  factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192), **LLAMA),
    'smollm2-135m': GPTConfig(vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                              mlp_hidden=1536, rope_theta=100000.0, **LLAMA),
}
GEMMA3 = dict(vocab_size=262144, block_size=32768, n_head=4, n_kv_head=1, head_dim=256, qk_norm=True, norm_eps=1e-6,
              bias=False, norm='rmsnorm_plus_one', pos_emb='rope', mlp='geglu', rope_theta=1e6, rope_local_theta=1e4,
              sliding_window=512, sandwich_norm=True, scale_embeddings=True, query_pre_attn_scalar=256)
for name, n_layer, n_embd, mlp_hidden in (('gemma-3-270m', 18, 640, 2048), ('gemma-3-1b', 26, 1152, 6912)):
    layer_types = ['full_attention' if i % 6 == 5 else 'sliding_attention' for i in range(n_layer)]
    SHAPES[name] = GPTConfig(n_layer=n_layer, n_embd=n_embd, mlp_hidden=mlp_hidden, layer_types=layer_types, **GEMMA3)


def random_model(config, dtype):
    """A GPT of this shape with N(0, 0.02) weights made directly in dtype (no float32 copy first)."""
    model = empty_model(config, dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = p.dim() == 1 and 'norm' in name or name.endswith(('ln_1.weight', 'ln_2.weight', 'ln_f.weight',
                                                                      '_out.weight'))
            p.fill_(0.0 if config.norm == 'rmsnorm_plus_one' else 1.0) if norm else p.normal_(0, 0.02)  # scale 1
    return model


def generate_speed(dev, device_type, dtype_name):
    if llamacpp and not Path(llamacpp).is_file():  # the flags first: nothing built when one is wrong
        die(f"--llamacpp={llamacpp}: no such file; give the path of llama.cpp's llama-bench (build/bin/llama-bench)")
    if llamacpp and (batch_size != 1 or device_type != 'cpu'):
        die("--llamacpp compares one prompt at a time on the CPU, as llama-bench does: --batch_size=1 --device=cpu")
    if shape:
        if shape not in SHAPES:
            die(f"--shape={shape}: use one of {', '.join(SHAPES)}")
        model = random_model(SHAPES[shape], getattr(torch, dtype_name))
    else:
        scratch = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size)
        try:
            model = load_pretrained(init_from, scratch=scratch)[0]
        except (OSError, ValueError) as e:
            die(e)
    model.eval().to(device=dev, dtype=getattr(torch, dtype_name))
    schemes = [s for s in quantize.split(',') if s != 'none']
    try:  # an unknown scheme, or int4 off a CPU, stops here; every scheme talks in the same dtype
        q_dtype = talk_dtype(schemes[0] if schemes else 'none', device_type, dtype_name)
        # the quantized copies beside the model itself, so that all are timed in the same rounds
        quantized = {s: cast_and_quantize(copy.deepcopy(model), s, device_type, dtype_name) for s in schemes}
    except ValueError as e:
        die(e)
    idx = torch.randint(0, model.config.vocab_size, (batch_size, prompt_tokens), device=dev)
    also = f" (and {' and '.join(schemes)} with {q_dtype} activations)" if schemes else ''
    print(f"{model.get_num_params() / 1e6:.1f}M params, {dtype_name}{also}, {dev}, threads={torch.get_num_threads()}, "
          f"batch {batch_size}, {prompt_tokens}-token prompt, {max_new_tokens} new tokens, greedy; "
          f"median of {repeats} interleaved rounds")
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        variants, read, steps = generation_variants(model, quantized, idx, device_type, dtype_name)
        if llamacpp:
            read.update(llama_cpp_variants(model, schemes, Path(tmp), variants))
        times, outs, first = time_interleaved(variants, device_type, 1, repeats)
    probe = memory_bandwidth(dev, bandwidth_mb) if bandwidth_mb else 0
    print_generation_table(times, read, probe)
    same = lambda a, b: f"{torch.equal(outs[a], outs[b])}" if a in outs and b in outs else 'not run'  # noqa: E731
    hf_rows = [n for n in variants if n.startswith('transformers')]
    print(f"KV cache == no cache: {same('ours, KV cache', 'ours, no cache (recompute the context)')}"
          + (f"; ours == transformers: {same('ours, KV cache', hf_rows[-1])}" if hf_rows else '')
          + (f"; transformers static == its own: {same(*hf_rows)}" if len(hf_rows) == 2 else ''))
    if compile:  # the first start compiles (Inductor's cache on disk makes the next start fast)
        print("first generation, compiling included: " + ', '.join(
            f"{name.split(',')[0]} {first[name]:.1f} s" for name in variants if name.endswith('compiled step')))
        # compiled logits against eager ones (random weights: a near tie may pick another greedy token)
        for label, m in [('ours', model)] + [(f'ours {s}', quantized[s]) for s in schemes]:
            print(f"{label} compiled step against eager, one step's logits: {compiled_gap(m, steps[label]):.3g} "
                  f"(largest difference over the logits' spread)")
    if profile:  # after the timed rounds, so that the profiler's own cost is not in the figures
        for name in [n for n in variants if n.startswith('ours') and n.endswith(', KV cache')]:
            with torch.no_grad(), torch.profiler.profile() as prof:
                variants[name]()
            where = 'device' if device_type == 'cuda' else 'cpu'
            print(f"{name}, one generation: where its time goes")
            print(prof.key_averages().table(sort_by=f'self_{where}_time_total', row_limit=10, max_name_column_width=40))


def weight_bytes(m):
    """The bytes a token reads: every weight once, but the token embedding's own rows are looked up, a few a token,
    not read whole (tied, they are the head's)."""
    looked_up = {id(p) for p in m.transformer.wte.parameters()} - {id(p) for p in m.lm_head.parameters()}
    return sum(p.numel() * p.element_size() for p in m.parameters() if id(p) not in looked_up)


def print_generation_table(times, read, probe):
    """One row per variant: tokens/s, ms/token, the GB/s its weights are read at (and its share of the probe's plain
    read), and the ratio to transformers or to llama.cpp at the same width."""
    hf_rows = [n for n in times if n.startswith('transformers')]
    width = {'': 'F16', 'int8': 'Q8_0', 'int4': 'Q4_0'}  # ours at a width -> llama.cpp's file at the same one
    print(f"{'variant':42s} {'tokens/s':>9s} {'ms/token':>9s} {'GB/s':>6s} {'of probe':>8s} {'vs':>16s}")
    for name, t in times.items():
        scheme = next((s for s in ('int8', 'int4') if name.startswith(f'ours {s}')), '')
        twin = f'llama.cpp {width[scheme]}'
        if name.startswith('ours') and 'KV cache' in name and twin in times:
            rel = f"{times[twin] / t:.2f}x {twin[10:]}"
        else:
            rel = f"{times[hf_rows[-1]] / t:.2f}x transformers" if hf_rows and name.startswith('ours') else '-'
        gbs = read[name] * max_new_tokens / t / 1e9 if name in read else 0
        share = f"{100 * gbs * 1e9 / probe:.0f}%" if probe and gbs else '-'
        print(f"{name:42s} {batch_size * max_new_tokens / t:9.1f} {1e3 * t / max_new_tokens:9.2f} "
              f"{gbs or float('nan'):6.1f} {share:>8s} {rel:>16s}")
    if probe:
        print(f"the machine's bandwidth probe: a plain read of {bandwidth_mb} MB with {torch.get_num_threads()} "
              f"threads, {probe / 1e9:.1f} GB/s (GB/s: the weights a token reads, times tokens/s)")


@torch.no_grad()
def compiled_gap(m, step):
    """One step's logits, compiled step against eager, from the same cache: the largest difference over the eager
    logits' spread (max - min)."""
    idx = torch.randint(0, m.config.vocab_size, (batch_size, 4), device=m.lm_head.weight.device)
    logits = []
    for decode_step in (None, step):
        cache = m.new_kv_cache(batch_size, 8, idx.device)
        m.next_logits(idx[:, :3], cache)
        logits.append(m.next_logits(idx, cache, decode_step).float())
    return float((logits[0] - logits[1]).abs().max() / (logits[0].max() - logits[0].min()))


def generation_variants(model, quantized, idx, device_type, dtype_name):
    """({row name: a function generating max_new_tokens greedily}, {row name: the weight bytes a token reads},
    {'ours' or 'ours int8'...: its compiled step}): ours with the KV cache (and compiled, and quantized), without
    it, and transformers' generate() on the same weights."""
    variants, read, steps = {}, {}, {}
    for label, m in [('ours', model)] + [(f'ours {s}', q) for s, q in quantized.items()]:
        # one cache per model for every run: a compiled step's graph is recorded for its addresses
        cache = m.new_kv_cache(batch_size, min(m.config.block_size, prompt_tokens + max_new_tokens), idx.device)

        def ours(m=m, cache=cache, decode_step=None):
            cache.restart(0)
            return m.generate(idx, max_new_tokens, temperature=0, kv_cache=cache, decode_step=decode_step)
        variants[f'{label}, KV cache'], read[f'{label}, KV cache'] = ours, weight_bytes(m)
        if compile:
            step = steps[label] = compile_decoding(m, True, device_type)
            variants[f'{label}, KV cache, compiled step'] = lambda ours=ours, step=step: ours(decode_step=step)
            read[f'{label}, KV cache, compiled step'] = read[f'{label}, KV cache']
    if uncached:
        variants['ours, no cache (recompute the context)'] = lambda: model.generate(idx, max_new_tokens, temperature=0,
                                                                                   use_cache=False)
    if compare_hf:
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            die("--compare_hf=True needs transformers: pip install transformers")
        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(model, tmp)  # the same weights, in the same dtype
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, dtype_name)).eval().to(idx.device)
        mask = torch.ones_like(idx)
        hf_generate = lambda **kw: hf.generate(idx, attention_mask=mask, max_new_tokens=max_new_tokens,  # noqa: E731
                                               min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kw)
        if compile:  # its fastest path: a static cache, with the forward compiled ('reduce-overhead', as ours)
            from transformers import CompileConfig
            config = CompileConfig(fullgraph=True, mode='reduce-overhead' if device_type == 'cuda' else 'default')
            config._compile_all_devices = True  # transformers compiles on its own only on accelerators
            variants['transformers, static cache, compiled'] = lambda: hf_generate(cache_implementation='static',
                                                                                   compile_config=config)
        variants['transformers generate(), its KV cache'] = hf_generate
    return variants, read, steps


def llama_cpp_variants(model, schemes, folder, variants):
    """Add llama-bench (--llamacpp) on GGUFs of the model's own weights: saved to a folder, written by export.py run
    as a program: F16, and Q8_0 and Q4_0 beside int8 and int4 (Q4_0 made by llama-quantize, found beside
    llama-bench). Same threads, batch 1, the same prompt and new tokens. Returns {row name: the GGUF's bytes a token
    reads}."""
    bench_bin = Path(llamacpp)  # (a file, batch 1, on the CPU: checked by generate_speed)
    if model.config.vocab_size < 256:
        die("--llamacpp needs a vocabulary of at least 256 tokens (the GGUF's tokenizer is GPT-2's or bytes)")
    tokenizer = get_tokenizer('gpt2' if model.config.vocab_size >= 50257 else 'bytes')
    save_pretrained(model, folder / 'model', tokenizer_json=tokenizer_json(tokenizer))
    export = [sys.executable, str(Path(__file__).with_name('export.py')), f'--init_from={folder / "model"}']
    files = {kind: folder / f'bench-{kind.lower()}.gguf' for kind in ('F16', 'Q8_0', 'Q4_0')}
    for kind in ['F16'] + ['Q8_0'] * ('int8' in schemes):
        proc = subprocess.run(export + [f'--to={files[kind]}', f'--type={kind.lower()}', '--name=bench'],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            die(f"export.py could not write {files[kind].name}: {proc.stderr.strip().splitlines()[-1:]}")
    quantizer = bench_bin.with_name('llama-quantize' + bench_bin.suffix)
    if 'int4' in schemes and quantizer.is_file():
        subprocess.run([str(quantizer), str(files['F16']), str(files['Q4_0']), 'Q4_0'], check=True, capture_output=True)
    elif 'int4' in schemes:
        print(f"(no {quantizer.name} beside {bench_bin}: no Q4_0 row)")
    read = {}
    for kind, path in files.items():
        if path.is_file():
            variants[f'llama.cpp {kind}'] = lambda path=path: run_llama_bench(bench_bin, path)
            # its file less the token embedding's own rows (looked up, as ours)
            embedding = 0 if model.config.tie_embeddings else gguf_tensor_bytes(path, 'token_embd.weight')
            if embedding is not None:
                read[f'llama.cpp {kind}'] = os.path.getsize(path) - embedding
    return read


def gguf_tensor_bytes(path, name):
    """The bytes one tensor takes in a GGUF, read by ggml's gguf package (pip install gguf), or None without it."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    return next(int(t.n_bytes) for t in GGUFReader(path).tensors if t.name == name)


def run_llama_bench(bench_bin, path):
    """Seconds llama-bench takes for the same work as one of our generations (its own timing, as a float: the
    process's start and the file's load are not counted): a prompt of prompt_tokens, then max_new_tokens."""
    work = ['-p', '0', '-n', str(max_new_tokens)] if prompt_tokens == 1 else \
        ['-p', '0', '-n', '0', '-pg', f'{prompt_tokens},{max_new_tokens}']
    proc = subprocess.run([str(bench_bin), '-m', str(path), *work, '-t', str(torch.get_num_threads()), '-r', '1',
                           '-o', 'json'], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        die(f"llama-bench failed on {path.name}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout)[0]['avg_ns'] / 1e9


def time_interleaved(variants, device_type, warmup, rounds):
    """({name: median seconds}, {name: its last output}, {name: seconds of its first, untimed run: a compiled
    step's compilation is in it}) over `rounds` rounds, each running every variant once
    in turn, after `warmup` untimed ones (allocations, kernels, compilation): a load on the machine that comes
    and goes then falls on every variant alike. A variant that times itself (an outside program) returns its
    seconds as a float."""
    times, outs, first = {name: [] for name in variants}, {}, {}
    for r in range(warmup + rounds):
        for name, fn in variants.items():
            synchronize(device_type)
            t0 = time.perf_counter()
            outs[name] = fn()
            synchronize(device_type)
            if r >= warmup:
                times[name].append(outs[name] if isinstance(outs[name], float) else time.perf_counter() - t0)
            elif r == 0:
                first[name] = time.perf_counter() - t0
    return {name: float(np.median(t)) for name, t in times.items()}, outs, first


def memory_bandwidth(dev, megabytes, tries=5):
    """Bytes/s of a plain read (a sum) of a megabytes-sized buffer, bigger than the caches, with the threads decoding
    uses, the best of `tries`: the speed limit of decoding one token, which reads every weight once."""
    buffer = torch.ones(megabytes * 2**20 // 4, device=dev)  # float32, every page touched
    best = float('inf')
    for _ in range(tries + 1):  # the first is a warm-up
        synchronize(dev.split(':')[0])
        t0 = time.perf_counter()
        buffer.sum()
        synchronize(dev.split(':')[0])
        best = min(best, time.perf_counter() - t0)
    return buffer.numel() * 4 / best


if __name__ == '__main__':
    configure(globals())
    dev, device_type, dtype_name, _ = setup(device, dtype, seed)
    if mode == 'generate':
        generate_speed(dev, device_type, dtype_name)
    elif mode == 'optimizer':
        optimizer_speed(dev, device_type, dtype_name)
    elif mode != 'train':
        die(f"--mode={mode}: use train, generate or optimizer")
    elif ablate:  # cumulative, in the book's order; what a CPU lacks is shown as n/a
        rows = [("baseline: float32, the book's LayerNorm/GELU/attention", {}), ('+ TF32 tensor cores', {'tf32': True}),
                ('+ fused AdamW', {'fused': True}), ('+ pinned memory', {'pin': True}),
                ('+ bfloat16 autocast', {'dtype_name': 'bfloat16'}),
                ('+ native LayerNorm and GELU', {'native_norms': True}), ('+ SDPA (flash) attention', {'sdpa': True}),
                ('+ torch.compile', {'compiled': True}),
                (f'+ vocab padded to {math.ceil(vocab_size / 64) * 64}', {'pad': 64}),
                ('+ micro-batch x2', {'bs': 2 * batch_size})]
        cfg = dict(bs=batch_size, pad=1, tf32=False, fused=False, pin=False, native_norms=False,
                   sdpa=False, compiled=False, dtype_name='float32')
        print(f"GPT {n_layer}x{n_embd}, context {block_size}, micro-batch {batch_size}, {dev}; "
              f"{warmup_steps} warm-up + {steps} timed steps each")
        print(f"{'change (cumulative)':52s} {'ms/step':>9s} {'tokens/s':>10s} {'speed-up':>9s} {'MFU':>6s}")
        base = None
        for name, change in rows:
            if device_type != 'cuda' and any(k in change for k in ('tf32', 'pin')):
                print(f"{name:52s} {'n/a on ' + device_type:>9s}")
                continue
            cfg.update(change)
            ms, tok_s, mfu, _ = train_speed(dev, device_type, **cfg)
            base = base or tok_s
            print(f"{name:52s} {ms:9.1f} {tok_s:10,.0f} {tok_s / base:8.2f}x {f'{100 * mfu:.1f}%' if mfu else '-':>6s}")
    else:
        cuda = device_type == 'cuda'
        ms, tok_s, mfu, mem = train_speed(dev, device_type, batch_size, pad_vocab, tf32=cuda, pin=cuda,
                                          fused=device_type in FUSED_ADAMW_DEVICES, native_norms=True, sdpa=True,
                                          compiled=compile, dtype_name=dtype_name, profiled=profile)
        print(f"GPT {n_layer}x{n_embd}, context {block_size}, batch {batch_size}, {dev} {dtype_name}"
              f"{', compiled' if compile else ''}{', grad checkpointing' if grad_checkpoint else ''}, {optimizer}")
        mfu_text = f'{100 * mfu:.1f}%' if mfu else 'n/a (not a known GPU)'
        print(f"{ms:.1f} ms/step | {tok_s:,.0f} tokens/s | MFU {mfu_text} | peak memory "
              f"{f'{mem / 2**30:.2f} GiB' if mem else 'n/a'}{' (process)' if not cuda else ''}")
        if profile:
            print("trace written to bench_trace/ (open with tensorboard, or the .json in chrome://tracing / perfetto)")
