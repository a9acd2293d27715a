"""
Speed measurements (nanoGPT's bench.py idea; the book's ch05 "speed-up" bonus as a table).
    python bench.py                                  # training steps, GPT-2 124M shape, synthetic tokens
    python bench.py --ablate=True                    # the book's speed-ups one at a time
    python bench.py --mode=generate --compare_hf=True --dtype=float16   # generation tokens/s
    python bench.py --mode=generate --shape=qwen3-0.6b --dtype=bfloat16 --batch_size=1 --compare_hf=True
    python bench.py --mode=generate --shape=qwen3-0.6b --batch_size=1 --quantize=int8   # int8 beside bf16
    python bench.py --mode=optimizer                 # one optimizer step alone, GPT-2 124M: fused AdamW vs Muon
"""
import copy
import math
import sys
import tempfile
import time
import types

import numpy as np
import torch
import torch.nn as nn

from configurator import configure, setup, die, maybe_compile, synchronize, gpu_peak_flops, compile_decoding
from model import FUSED_ADAMW_DEVICES, GPT, GPTConfig
from quantize import Int4Linear, Int8Linear, cast_and_quantize, talk_dtype
from weights import empty_model, load_pretrained, save_pretrained
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
bandwidth_mb = 1024  # generate: MB of the matrix whose matrix-vector product measures memory bandwidth (0 = skip)
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
    seconds, _ = time_interleaved({name: opt.step for name, opt in opts.items()}, device_type, warmup_steps, steps)
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
    with torch.no_grad():
        variants = generation_variants(model, quantized, idx, device_type, dtype_name)
        times, outs = time_interleaved(variants, device_type, 1, repeats)
    hf_rows = [n for n in variants if n.startswith('transformers')]
    print(f"{'variant':42s} {'tokens/s':>9s} {'ms/token':>9s} {'vs transformers':>16s}")
    for name, t in times.items():
        rel = f"{times[hf_rows[-1]] / t:.2f}x" if hf_rows else '-'
        print(f"{name:42s} {batch_size * max_new_tokens / t:9.1f} {1e3 * t / max_new_tokens:9.2f} {rel:>16s}")
    same = lambda a, b: f"{torch.equal(outs[a], outs[b])}" if a in outs and b in outs else 'not run'  # noqa: E731
    print(f"KV cache == no cache: {same('ours, KV cache', 'ours, no cache (recompute the context)')}"
          + (f"; compiled == eager: {same('ours, KV cache', 'ours, KV cache, compiled step')}" if compile else '')
          + ''.join(f"; {s} compiled == {s} eager: {same(f'ours {s}, KV cache', f'ours {s}, KV cache, compiled step')}"
                    for s in schemes if compile)
          + (f"; ours == transformers: {same('ours, KV cache', hf_rows[-1])}" if hf_rows else '')
          + (f"; transformers static == its own: {same(*hf_rows)}" if len(hf_rows) == 2 else ''))
    if profile:  # after the timed rounds, so that the profiler's own cost is not in the figures
        for name in [n for n in variants if n.startswith('ours') and n.endswith(', KV cache')]:
            with torch.no_grad(), torch.profiler.profile() as prof:
                variants[name]()
            where = 'device' if device_type == 'cuda' else 'cpu'
            print(f"{name}, one generation: where its time goes")
            print(prof.key_averages().table(sort_by=f'self_{where}_time_total', row_limit=10, max_name_column_width=40))
    # a token reads every weight once: what that costs against what the memory can deliver
    for label, m, scheme in [('', model, 'none')] + [(f'{s} ', quantized[s], s) for s in schemes]:
        # the token embedding's own rows are looked up, a few a token, not read whole (tied, they are the head's)
        looked_up = {id(p) for p in m.transformer.wte.parameters()} - {id(p) for p in m.lm_head.parameters()}
        weight_bytes = sum(p.numel() * p.element_size() for p in m.parameters() if id(p) not in looked_up)
        best = min(t for name, t in times.items() if name.startswith(f'ours {label}'.rstrip() + ', KV'))
        read = weight_bytes * max_new_tokens / best
        line = f"{label}weights {weight_bytes / 1e9:.2f} GB; our fastest {label}decoding reads {read / 1e9:.1f} GB/s"
        if bandwidth_mb:
            talk = getattr(torch, dtype_name if scheme == 'none' else q_dtype)
            peak = memory_bandwidth(dev, talk, bandwidth_mb, scheme)
            line += f"; the machine's {label}bandwidth probe {peak / 1e9:.1f} GB/s ({100 * read / peak:.0f}% of it)"
        print(line)


def generation_variants(model, quantized, idx, device_type, dtype_name):
    """{row name: a function generating max_new_tokens greedily}: ours with the KV cache (and compiled, and
    quantized), without it, and transformers' generate() on the same weights."""
    variants = {}
    for label, m in [('ours', model)] + [(f'ours {s}', q) for s, q in quantized.items()]:
        # one cache per model for every run: a compiled step's graph is recorded for its addresses
        cache = m.new_kv_cache(batch_size, min(m.config.block_size, prompt_tokens + max_new_tokens), idx.device)

        def ours(m=m, cache=cache, decode_step=None):
            cache.restart(0)
            return m.generate(idx, max_new_tokens, temperature=0, kv_cache=cache, decode_step=decode_step)
        variants[f'{label}, KV cache'] = ours
        if compile:
            step = compile_decoding(m, True, device_type)
            variants[f'{label}, KV cache, compiled step'] = lambda ours=ours, step=step: ours(decode_step=step)
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
    return variants


def time_interleaved(variants, device_type, warmup, rounds):
    """({name: median seconds}, {name: its last output}) over `rounds` rounds, each running every variant once
    in turn, after `warmup` untimed ones (allocations, kernels, compilation): a load on the machine that comes
    and goes then falls on every variant alike."""
    times, outs = {name: [] for name in variants}, {}
    for r in range(warmup + rounds):
        for name, fn in variants.items():
            synchronize(device_type)
            t0 = time.perf_counter()
            outs[name] = fn()
            synchronize(device_type)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}, outs


def memory_bandwidth(dev, dtype, megabytes, scheme='none', tries=5):
    """Bytes/s that a matrix-vector product of a megabytes-sized matrix reads (the best of `tries`): the speed limit
    of decoding one token, which does the same with every weight. Computed as a Linear layer does (x @ W^T, one row
    of x), or an Int8Linear or Int4Linear for int8 or int4, so that it runs the kernels decoding runs."""
    cols = 4096
    with torch.device('meta'):
        bits = {'int8': 8, 'int4': 4}.get(scheme, torch.finfo(dtype).bits)
        linear = nn.Linear(cols, megabytes * 2**23 // (cols * bits) // 16 * 16, bias=False)  # rows: int4 packs 16
        layer = {'int8': Int8Linear, 'int4': Int4Linear}.get(scheme, lambda linear: linear)(linear)
    layer = layer.to_empty(device=dev).to(dtype)
    with torch.no_grad():  # random values made in place: no float32 copy of the matrix first
        for p in layer.parameters():
            low, high = (-127, 128) if p.dtype == torch.int8 else (0, 256)  # int8, or int4 packed two to a uint8
            p.normal_() if p.is_floating_point() else p.random_(low, high)
    x = torch.randn(1, cols, device=dev, dtype=dtype)
    best = float('inf')
    with torch.no_grad():
        for _ in range(tries + 1):  # the first is a warm-up
            synchronize(dev.split(':')[0])
            t0 = time.perf_counter()
            layer(x)
            synchronize(dev.split(':')[0])
            best = min(best, time.perf_counter() - t0)
    return sum(p.numel() * p.element_size() for p in layer.parameters()) / best


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
