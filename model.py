"""The whole GPT in one file (book chapters 3-4; LoRA appendix E; the "GPT to Llama" bonus). GPT-2 exactly: learned
token + position embeddings, pre-LayerNorm blocks, one fused qkv projection, flash/SDPA causal attention, tanh-GELU MLP,
head tied to the token embedding. The Llama family and Gemma 3 are the same class with other GPTConfig fields: RMSNorm,
rotary positions, SwiGLU/GeGLU, grouped-query and sliding-window attention. Plus KV-cache generation, LoRA, Muon.
Imports only torch and the standard library: files (checkpoints, published weights, downloads) are weights.py's job."""
import copy
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024   # context length
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True        # biases in Linears and LayerNorms, as GPT-2 (False: a bit faster)
    padded_vocab_size: int = 0  # embedding/head rows, 0 = vocab_size; nanoGPT's 50304 (64 x 786) suits tensor cores
    # --- what turns GPT-2 into the Llama family (Llama 3.2, Qwen2.5, Qwen3, SmolLM2); the defaults are GPT-2's
    norm: str = 'layernorm'  # layernorm (GPT-2) | rmsnorm (Llama: no mean, no bias)
    norm_eps: float = 1e-5
    pos_emb: str = 'learned'  # learned (GPT-2's wpe table) | rope (rotary: positions rotate queries and keys)
    rope_theta: float = 10000.0  # RoPE's base wavelength (Llama 3: 500,000; Qwen: 1,000,000)
    rope_scaling: dict = None  # Llama 3's {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
    mlp: str = 'gelu'  # gelu (GPT-2: 4x wide, tanh GELU) | swiglu (Llama: silu(gate) * up)
    mlp_hidden: int = 0  # the MLP's hidden width; 0 = 4 * n_embd
    n_kv_head: int = 0  # key/value heads, shared by groups of query heads (grouped-query attention); 0 = n_head
    head_dim: int = 0  # 0 = n_embd // n_head (Qwen3's differs)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before RoPE (Qwen3)
    qkv_bias: bool = False  # biases on the q/k/v projection even without `bias` (Qwen2.5)
    tie_embeddings: bool = True  # the head shares the token embedding's weights (GPT-2, Llama 3.2 1B, Qwen3-0.6B)
    # --- Gemma 3 (270M, 1B): norm='rmsnorm_plus_one', mlp='geglu', qk_norm, and these
    layer_types: list = None  # each layer's: full_attention | sliding_attention (its last sliding_window tokens)
    sliding_window: int = 0
    rope_local_theta: float = 0.0  # the sliding layers' RoPE base (Gemma 3: 10,000 beside 1,000,000); 0 = rope_theta
    sandwich_norm: bool = False  # a norm after attention and after the MLP too, before each joins the residual
    scale_embeddings: bool = False  # token embeddings times sqrt(n_embd)
    query_pre_attn_scalar: float = 0.0  # attention scores scaled by its -1/2 power; 0 = head_dim

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.mlp_hidden = self.mlp_hidden or 4 * self.n_embd
        kinds = set(self.layer_types or ()) - {'full_attention', 'sliding_attention'}
        if kinds or len(self.layer_types or range(self.n_layer)) != self.n_layer:
            raise ValueError(f"layer_types must list full_attention or sliding_attention for each of the "
                             f"{self.n_layer} layers{f', not {sorted(kinds)[0]!r}' if kinds else ''}")

    def window(self, i):  # how many of the latest tokens layer i attends to: its sliding window, or 0 (all of them)
        return self.sliding_window if self.layer_types and self.layer_types[i] == 'sliding_attention' else 0


FUSED_ADAMW_DEVICES = ('cuda', 'cpu')  # where torch.optim.AdamW(fused=True) runs: one pass over all params
ONEDNN_AT_ONE_ROW = {}  # dtype -> whether oneDNN computes one-row matmuls on this CPU (measured once: one_row_kernels)
ONEDNN_OUTSIDE_STEP = []  # oneDNN's setting outside the one_row_kernels scope now open (attention's matmuls keep it)
PRESETS = {  # the four GPT-2 sizes: 124M, 355M, 774M, 1558M parameters
    'gpt2': dict(n_layer=12, n_head=12, n_embd=768), 'gpt2-medium': dict(n_layer=24, n_head=16, n_embd=1024),
    'gpt2-large': dict(n_layer=36, n_head=20, n_embd=1280), 'gpt2-xl': dict(n_layer=48, n_head=25, n_embd=1600)}


class RMSNormPlusOne(nn.RMSNorm):
    """Gemma's RMSNorm: in float32, scaled by (1 + weight), so its weights are stored as offsets from 1."""
    def reset_parameters(self):
        nn.init.zeros_(self.weight)

    def forward(self, x):
        return (F.rms_norm(x.float(), self.normalized_shape, eps=self.eps) * (1 + self.weight.float())).type_as(x)


def make_norm(config, dim):
    if config.norm in ('rmsnorm', 'rmsnorm_plus_one'):
        return (RMSNormPlusOne if config.norm == 'rmsnorm_plus_one' else nn.RMSNorm)(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def rope_frequencies(config, theta=None):
    """RoPE's inverse wavelengths (head_dim // 2,): pair i of each head turns by pos * inv_freq[i]. Llama 3 stretches
    the long wavelengths by `factor` (reaching past its pretraining context), keeps the short, blends those between."""
    d = config.head_dim
    inv_freq = 1.0 / (theta or config.rope_theta) ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    if sc := config.rope_scaling:
        old_context = sc['original_max_position_embeddings']
        wavelen = 2 * math.pi / inv_freq
        low_freq_wavelen, high_freq_wavelen = old_context / sc['low_freq_factor'], old_context / sc['high_freq_factor']
        smooth = (old_context / wavelen - sc['low_freq_factor']) / (sc['high_freq_factor'] - sc['low_freq_factor'])
        blended = (1 - smooth) * inv_freq / sc['factor'] + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_freq_wavelen, inv_freq / sc['factor'],
                               torch.where(wavelen < high_freq_wavelen, inv_freq, blended))
    return inv_freq


def apply_rope(x, cos, sin):
    """Rotate (B, nh, T, hs) queries or keys: pair (x[i], x[i + hs/2]) by its position's angle (HF's half split)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def one_query_attention(q, k, v, mask=None, scale=None):
    """One new token's attention to S cached keys in plain matmuls (on a CPU in bf16 SDPA costs 10x a key past ~64 keys,
    RESULTS.md). q (B, nh, 1, hs), k, v (B, n_kv_head, S, hs), mask None or bool (B or 1, 1, 1, S) -> (B, nh, 1, hs)."""
    B, nh, _, hs = q.shape
    # the query heads that read each key/value head, as rows, scaled before the matmul (float16 cannot overflow then)
    rows = q.reshape(B, k.size(1), nh // k.size(1), hs) * (scale or hs ** -0.5)
    if torch.compiler.is_compiling():  # compiled: sums Inductor fuses, reading each key once, in float32
        scores = (k[:, :, None].float() * rows[:, :, :, None].float()).sum(-1)  # (B, n_kv_head, nh / n_kv_head, S)
        scores = scores if mask is None else scores.masked_fill(~mask, float('-inf'))
        return (scores.softmax(dim=-1)[..., None] * v[:, :, None].float()).sum(-2).to(v.dtype).view(B, nh, 1, hs)
    with onednn_enabled((ONEDNN_OUTSIDE_STEP or [torch.backends.mkldnn.enabled])[-1]):  # not one_row_kernels' choice
        # keys times queries, then turned: rows @ k^T would first copy the cached keys (a slice of the cache) whole
        scores = (k @ rows.transpose(-2, -1)).transpose(-2, -1).float()  # (B, n_kv_head, nh / n_kv_head, S)
        scores = scores if mask is None else scores.masked_fill(~mask, float('-inf'))
        return (scores.softmax(dim=-1).to(v.dtype) @ v).view(B, nh, 1, hs)  # softmax in float32, as SDPA's


@contextmanager
def onednn_enabled(enabled):
    """`with onednn_enabled(False):` ATen's own CPU kernels, not oneDNN's (torch.backends.mkldnn), then as before."""
    before, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


@contextmanager
def one_row_kernels(dtype, device):
    """`with one_row_kernels(dtype, device):` a one-token step; on a CPU in bf16/fp16 with ATen's own one-row matmul
    (x @ W^T) if a once-per-dtype timing on a 128 MB matrix (past the caches) finds it 10% faster than oneDNN's, as
    without AMX (oneDNN reads bf16 at half the memory's speed there: RESULTS.md); else oneDNN, as before."""
    onednn = torch.backends.mkldnn.enabled
    if onednn and device.type == 'cpu' and dtype in (torch.bfloat16, torch.float16):
        if dtype not in ONEDNN_AT_ONE_ROW:
            w, x, best = torch.ones(2**14, 4096, dtype=dtype), torch.ones(1, 4096, dtype=dtype), {}
            for kind in (True, False) * 3:  # interleaved, the best of each: a passing load falls on both
                with onednn_enabled(kind):
                    start = time.perf_counter()
                    F.linear(x, w)
                    best[kind] = min(best.get(kind, float('inf')), time.perf_counter() - start)
            ONEDNN_AT_ONE_ROW[dtype] = best[False] > 0.9 * best[True]
        onednn = ONEDNN_AT_ONE_ROW[dtype]
    ONEDNN_OUTSIDE_STEP.append(torch.backends.mkldnn.enabled)
    try:
        with onednn_enabled(onednn):
            yield
    finally:
        ONEDNN_OUTSIDE_STEP.pop()


class CausalSelfAttention(nn.Module):  # ch03: multi-head attention (+ grouped-query attention, RoPE)
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        assert self.n_head % self.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        self.sizes = [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim]
        self.c_attn = nn.Linear(config.n_embd, sum(self.sizes), bias=config.bias or config.qkv_bias)  # q, k, v at once
        self.c_proj = nn.Linear(self.sizes[0], config.n_embd, bias=config.bias)
        if config.qk_norm:
            self.q_norm, self.k_norm = make_norm(config, self.head_dim), make_norm(config, self.head_dim)
        self.qk_norm = config.qk_norm
        self.window = config.window(layer_idx)  # 0: attends to the whole context; else to its last `window` tokens
        self.scale = config.query_pre_attn_scalar ** -0.5 if config.query_pre_attn_scalar else None  # None: SDPA's
        self.resid_dropout, self.dropout = nn.Dropout(config.dropout), config.dropout  # the latter: SDPA's dropout_p
        self.layer_idx = layer_idx  # which slot of a KVCache is ours

    def forward(self, x, rope=None, kv_cache=None, mask=None, slot=None):
        B, T, C = x.size()
        # (B, T, heads * hs) -> (B, heads, T, hs): each head attends on its own; k and v have n_kv_head heads
        q, k, v = [t.unflatten(2, (-1, self.head_dim)).transpose(1, 2) for t in self.c_attn(x).split(self.sizes, dim=2)]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v, slot)  # (B, n_kv_head, S, hs): the cached keys and values too
        # no mask: causal, or one token seeing all the cache; else the keys each query sees (prefix, padding, window)
        if T == 1 and not self.training and q.device.type == 'cpu' and q.dtype != torch.float32 and k.size(2) > 64:
            y = one_query_attention(q, k, v, mask, self.scale)  # decoding on a CPU in bf16/fp16: SDPA is slow there
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout * self.training,
                                               is_causal=mask is None and T > 1, scale=self.scale,
                                               enable_gqa=self.n_kv_head != self.n_head)  # a group of heads reads one
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):  # ch04: feed forward with GELU (or Llama's SwiGLU, Gemma's GeGLU)
    def __init__(self, config):
        super().__init__()
        self.gated, self.swiglu = config.mlp in ('swiglu', 'geglu'), config.mlp == 'swiglu'
        width = config.mlp_hidden * (2 if self.gated else 1)  # SwiGLU, GeGLU: gate and up in one matmul
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh')  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.dropout(self.c_proj((F.silu(gate) if self.swiglu else self.gelu(gate)) * up))
        return self.dropout(self.c_proj(self.gelu(h)))


class Block(nn.Module):  # ch04: the transformer block, pre-norm
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)
        self.ln_attn_out, self.ln_mlp_out = (make_norm(config, config.n_embd) if config.sandwich_norm else nn.Identity()
                                             for _ in range(2))  # Gemma's sandwich: outputs normed before the residual

    def forward(self, x, rope=None, kv_cache=None, mask=None, slot=None):
        x = x + self.ln_attn_out(self.attn(self.ln_1(x), rope, kv_cache, mask, slot))
        return x + self.ln_mlp_out(self.mlp(self.ln_2(x)))


def attention_mask(query_slots, key_slots, window=0, pads=None):
    """Which keys (slots (S,) or (1, S); < 0: empty) each query (slots (1, T)) sees, a bool (1 or B, 1, T, S): those at
    or before it, in its last `window` if one, no padding (pads (B, 1, 1); a padding query sees itself: no NaN row)."""
    q, k = query_slots[..., None], key_slots[..., None, :]
    sees = (k <= q) & (k >= 0)
    if window:
        sees = sees & (k > q - window)
    if pads is not None:
        sees = sees & ((k >= pads) | (k == q))
    return sees[:, None]


class KVCache:
    """Keys and values of the tokens seen so far, for every layer: each new token costs one position of work (the
    book's ch04 bonus). Allocated once, `length` slots: a fixed shape, so a compiled step is one graph. It holds the
    n_kv_head shared heads, and a sliding-window layer only its window, in a ring (slot s at s % window). padding: (B,)
    left pads per row, or None: never attended to; positions count from a row's first token, so each reads as alone.
    Its fields are written here and by GPT only; callers ask: restart, truncate, repeat_rows."""
    def __init__(self, config, batch_size, device, dtype, length=None, padding=None):
        self.length = min(length or config.block_size, config.block_size)  # no position lies beyond block_size
        windows = [config.window(i) for i in range(config.n_layer)]
        self.ring = config.sliding_window if any(0 < w < self.length for w in windows) else 0
        self.in_ring = [w > 0 and self.ring > 0 for w in windows]
        # one tensor per layer: a compiled step writes each in place (a slice of one big tensor would be copied whole)
        self.k = [torch.zeros(batch_size, config.n_kv_head, self.ring if ring else self.length, config.head_dim,
                              device=device, dtype=dtype) for ring in self.in_ring]  # zeros, not empty: 0 * NaN = NaN
        self.v, self.padding = [torch.zeros_like(k) for k in self.k], padding
        # the compiled step's write slot, one tensor refilled each step: a Python int would recompile per step
        self.step_slot = torch.zeros(1, dtype=torch.long, device=device)
        self.restart(0)

    def update(self, layer_idx, k, v, slot=None):
        """Store (B, n_kv_head, T, hs) new keys/values of one layer after the `filled` slots, return all so far (a ring:
        what it held, then the new); the compiled step: write at the tensor `slot`, return every slot (masked)."""
        K, V = self.k[layer_idx], self.v[layer_idx]
        if slot is not None:
            K.index_copy_(2, slot % K.size(2), k)  # a ring's place for the slot, else the slot itself
            V.index_copy_(2, slot % K.size(2), v)
            return K, V
        end = self.filled + k.size(2)
        if not self.in_ring[layer_idx]:
            K[:, :, self.filled:end], V[:, :, self.filled:end] = k, v
            return K[:, :, :end], V[:, :, :end]
        keys, values = (torch.cat((K, k), dim=2), torch.cat((V, v), dim=2)) if self.filled else (k, v)
        n = min(k.size(2), self.ring)  # the ring keeps the last `ring` of them
        where = torch.arange(end - n, end, device=k.device) % self.ring
        K.index_copy_(2, where, k[:, :, -n:])
        V.index_copy_(2, where, v[:, :, -n:])
        return keys, values

    def positions_and_mask(self, T, slot=None):
        """For T new tokens: their positions (1 or B, T), and the slots each may attend to in the full layers and in the
        ring's, bool masks (1 or B, 1, T, slots), each None where plain causal attention is exact (SDPA's fast path)."""
        device = self.k[0].device
        pads = None if self.padding is None else self.window_padding[:, None, None]  # (B, 1, 1)
        if slot is not None:  # one token at slot `slot`, every slot given to attention
            query_slots, key_slots = slot.view(1, 1), torch.arange(self.length, device=device)
        else:
            query_slots = torch.arange(self.filled, self.filled + T, device=device)[None]
            key_slots = torch.arange(self.filled + T, device=device)
        plain = slot is None and pads is None and (T == 1 or self.filled == 0)
        mask = local = None if plain else attention_mask(query_slots, key_slots, 0, pads)
        if self.ring:  # the slot each ring place holds: the latest one up to `last` with that remainder (< 0: none)
            last = query_slots[:, :1] if slot is not None else self.filled - 1
            held = last - (last - torch.arange(self.ring, device=device)) % self.ring
            if slot is None:  # what the ring held (if anything), then the new keys
                held = torch.cat((held, query_slots[0])) if self.filled else query_slots[0]
            plain = slot is None and pads is None and self.filled == 0 and T <= self.ring
            local = None if plain else attention_mask(query_slots, held, self.ring, pads)
        positions = query_slots if pads is None else (query_slots - pads[:, :, 0]).clamp(min=0)
        return positions, mask, local

    def restart(self, offset=0):  # empty the cache; it will hold the text from token `offset` on (the window slides)
        self.filled = 0  # how many slots hold a token
        self.offset = offset  # which token of the text is in slot 0 (> 0 once the window has slid)
        # the padding left in the window, as a tensor: a compiled step reading the int offset would recompile per slide
        self.window_padding = None if self.padding is None else (self.padding - offset).clamp(min=0)

    def truncate(self, n):  # keep the first n filled slots (what the next text shares); a ring that lost them restarts
        self.filled = min(self.filled, n if not self.ring or n >= self.filled - 1 else 0)

    def repeat_rows(self, repeats):
        """A cache with row i of this one repeated repeats[i] times (eval.py: choices continuing one context each)."""
        new, repeats = copy.copy(self), torch.as_tensor(repeats, device=self.k[0].device)
        new.k, new.v = ([t.repeat_interleave(repeats, dim=0) for t in kv] for kv in (self.k, self.v))
        if self.padding is not None:
            new.padding, new.window_padding = (t.repeat_interleave(repeats) for t in (new.padding, new.window_padding))
        return new


class GPT(nn.Module):  # ch04: the GPT model
    def __init__(self, config):
        super().__init__()
        self.config = config
        V = max(config.padded_vocab_size, config.vocab_size)
        learned_positions = config.pos_emb == 'learned'  # GPT-2: a vector per position; RoPE rotates q and k instead
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, config.n_embd),                   # token embedding
            **({'wpe': nn.Embedding(config.block_size, config.n_embd)} if learned_positions else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd)))
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        if config.pos_emb == 'rope':  # cos and sin of every (position, frequency) angle, (block_size, hs), built once
            self.rope_tables = ['rope_cos', 'rope_sin'] + (['rope_local_cos', 'rope_local_sin']  # Gemma: sliding layers
                                                           if config.rope_local_theta else [])
            for name in self.rope_tables:  # on the model's device, not saved: they follow from the config
                self.register_buffer(name, torch.empty(config.block_size, config.head_dim), persistent=False)
            self.init_rope()
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2 (saves 38.6M params at 124M)
        self.grad_checkpoint = False  # True: activation checkpointing per block (less memory, ~1/3 more compute)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith('c_proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @torch.no_grad()
    def init_rope(self):  # fill the RoPE tables in float32 (again after a meta-device build: it leaves buffers empty)
        device = self.rope_cos.device
        for cos, sin, theta in zip(self.rope_tables[::2], self.rope_tables[1::2], (None, self.config.rope_local_theta)):
            angles = torch.arange(self.config.block_size, dtype=torch.float32, device=device)[:, None] \
                * rope_frequencies(self.config, theta).to(device)[None, :]  # (block_size, hs / 2)
            angles = torch.cat((angles, angles), dim=-1)  # the half-split layout: pair (i, i + hs/2) shares an angle
            getattr(self, cos).copy_(angles.cos())
            getattr(self, sin).copy_(angles.sin())

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_num_params(self):  # all parameters, the tied head counted once (124,439,808 for GPT-2 124M)
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx, kv_cache=None, slot=None):
        """(B, T) token ids -> (B, T, n_embd) final-normed states (the trunk). With a kv_cache, idx continues what it
        holds, and it then holds idx too; with a slot (a tensor), idx is one token written there (the compiled step)."""
        B, T = idx.size()
        filled = 0 if kv_cache is None or slot is not None else kv_cache.filled
        if filled + T > self.config.block_size:
            raise ValueError(f"sequence of {filled + T} tokens is longer than block_size {self.config.block_size}")
        window = self.config.sliding_window
        if kv_cache is None:  # causal (SDPA's own mask), and the sliding layers' window where T passes it
            pos, mask = torch.arange(T, device=idx.device)[None], None  # (1, T)
            local_mask = attention_mask(pos, pos[0], window) if self.config.layer_types and 0 < window < T else None
        else:
            pos, mask, local_mask = kv_cache.positions_and_mask(T, slot)  # (1 or B, T)
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.scale_embeddings:  # (the factor rounded to x's dtype first, as Gemma's own code does)
            x = x * torch.tensor(self.config.n_embd ** 0.5, dtype=x.dtype)
        rope = local_rope = None
        if self.config.pos_emb == 'learned':
            x = x + self.transformer.wpe(pos)
        else:  # cos and sin of each position's angles, (1 or B, 1, T, hs): they broadcast over the heads
            tables = [getattr(self, name)[pos].to(x.dtype)[:, None] for name in self.rope_tables]
            rope, local_rope = tables[:2], tables[-2:]
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            block_rope, block_mask = (local_rope, local_mask) if block.attn.window else (rope, mask)
            if self.grad_checkpoint and self.training:  # keep only each block's input; recompute the rest in backward
                x = torch.utils.checkpoint.checkpoint(block, x, block_rope, None, block_mask, use_reentrant=False)
            else:
                x = block(x, block_rope, kv_cache, block_mask, slot)
        if kv_cache is not None and slot is None:
            kv_cache.filled += T
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """logits (B, T, vocab_size); loss: cross-entropy vs targets (B, T), -100 ignored (None without targets)."""
        logits = self.lm_head(self.hidden_states(idx))  # (B, T, padded_vocab_size)
        V = self.config.vocab_size
        if logits.size(-1) > V:  # padding: -inf gets softmax 0, so it is never scored and gets no gradient.
            with torch.no_grad():  # in place and outside autograd, so the (B, T, V) logits are never copied
                logits[..., V:] = float('-inf')
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                                            ignore_index=-100)
        return logits[..., :V], loss  # with padding a view: use .reshape() rather than .view() on it

    def crop_block_size(self, block_size):
        """Use a shorter context than the weights were trained with (e.g. GPT-2's 1024 -> 256)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if self.config.pos_emb == 'learned':
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        else:
            for name in self.rope_tables:
                setattr(self, name, getattr(self, name)[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer='adamw', muon_lr=0.02,
                             muon_dtype=torch.bfloat16):
        """AdamW with weight decay on matrices and embeddings (>= 2-D) only, fused on CUDA and CPU. optimizer='muon':
        Muon for the blocks' 2-D weights (decayed as AdamW's, Moonshot's "Muon is Scalable"), AdamW for the rest.
        'lr_scale': a group's lr relative to learning_rate. muon_dtype: Newton-Schulz's."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if optimizer == 'adamw':
            groups = [{'params': [p for _, p in named if p.dim() >= 2], 'weight_decay': weight_decay},
                      {'params': [p for _, p in named if p.dim() < 2], 'weight_decay': 0.0}]
            return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in FUSED_ADAMW_DEVICES)
        if optimizer != 'muon':
            raise ValueError(f"unknown optimizer {optimizer!r}; use adamw or muon")
        hidden = [p for n, p in named if p.dim() == 2 and '.h.' in n]  # embeddings (wte = head) stay with AdamW
        embed, rest = [p for n, p in named if p.dim() >= 2 and '.h.' not in n], [p for _, p in named if p.dim() < 2]
        return MuonWithAdamW([
            {'params': hidden, 'use_muon': True, 'lr': muon_lr, 'lr_scale': muon_lr / learning_rate,
             'momentum': 0.95, 'weight_decay': weight_decay, 'ns_dtype': muon_dtype},
            {'params': embed, 'use_muon': False, 'lr': learning_rate, 'betas': betas, 'weight_decay': weight_decay},
            {'params': rest, 'use_muon': False, 'lr': learning_rate, 'betas': betas, 'weight_decay': 0.0}])

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward): 6N + attention (PaLM appendix B)."""
        cfg = self.config
        N = self.get_num_params() - (self.transformer.wpe.weight.numel() if cfg.pos_emb == 'learned' else 0)
        return 6 * N + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size

    def estimate_mfu(self, tokens_per_s, peak_flops):  # model FLOPs utilisation: achieved FLOP/s over the peak
        return self.flops_per_token() * tokens_per_s / peak_flops if peak_flops else None

    # ---------------------------------------------------------------- generation (ch05)
    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                 use_cache=True, on_token=None, generator=None, kv_cache=None, padding=None, decode_step=None):
        """Append up to max_new_tokens to idx (B, T), return it (B, T + n): the book's ch05 generate, with a KV cache
        (equal to use_cache=False within block_size); temperature=0 greedy; rows past eos_id padded with it, stop once
        all are. on_token(next_ids (B,)): after each step. kv_cache: a KVCache holding idx's first kv_cache.filled
        tokens (a chat's earlier turns). padding: (B,) left pads per row. decode_step: the compiled one-token step."""
        B, T = idx.shape
        cache = kv_cache
        if cache is None and (use_cache or padding is not None):
            cache = self.new_kv_cache(B, min(self.config.block_size, T + max_new_tokens), idx.device, padding)
        if cache is not None:
            cache.truncate(T - 1)  # at least the last token is fed again: its logits are needed
            if decode_step is not None:
                for tensor in cache.k + cache.v:  # CUDA graphs may then write them in place
                    torch._dynamo.mark_static_address(tensor, guard=False)
        out = torch.cat((idx, idx.new_zeros(B, max_new_tokens)), dim=1)  # filled in place: no growing copies
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            text = out[:, :T + step]
            if cache is None:
                logits = self.lm_head(self.hidden_states(text[:, -self.config.block_size:])[:, -1])
            else:
                logits = self.next_logits(text, cache, decode_step)
            next_id = sample_next(logits[:, :self.config.vocab_size], temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_id = torch.where(done, eos_id, next_id)
                done |= next_id == eos_id
            out[:, T + step] = next_id
            if on_token is not None:
                on_token(next_id)
            # done.all() waits for the device: asked every 8 tokens (or each one when streamed, which waits anyway)
            if eos_id is not None and (on_token is not None or step % 8 == 7) and bool(done.all()):
                return out[:, :T + step + 1]
        if cache is not None and cache.offset:  # the window slid: the cache no longer holds the text's start
            cache.restart(0)
        return out

    def new_kv_cache(self, batch_size, length, device, padding=None):
        """A KVCache in the dtype attention computes in (autocast's, else the weights')."""
        dtype = self.transformer.ln_f.weight.dtype  # the final norm's, not the head's (int8 once quantized)
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype
        return KVCache(self.config, batch_size, device, dtype, length, padding)

    def next_logits(self, text, cache, decode_step=None):
        """(B, padded vocab) logits for the token after text (B, T), computing only the tokens the cache lacks; when
        they do not fit, the window slides (the cache restarts from its last half; a long prompt: its last length)."""
        if text.size(1) - cache.offset > cache.length:
            keep = cache.length if cache.filled == 0 else cache.length // 2
            cache.restart(offset=text.size(1) - keep)
        new = text[:, cache.offset + cache.filled:]
        with one_row_kernels(cache.k[0].dtype, new.device) if new.size(1) == 1 else nullcontext():
            if decode_step is None or new.size(1) > 1:  # a prompt (a variable length) is always computed eagerly
                return self.lm_head(self.hidden_states(new, cache)[:, -1])
            cache.step_slot.fill_(cache.filled)
            logits = decode_step(new.clone(memory_format=torch.contiguous_format), cache, cache.step_slot)  # one graph
            cache.filled += 1
            return logits

    def decode_step(self, token, cache, slot):
        """(B, 1) token -> (B, padded vocab) logits, every shape fixed: the cache is read whole and written at `slot` (a
        tensor), so torch.compile makes one graph (CUDA graphs with mode='reduce-overhead') for every step."""
        return self.lm_head(self.hidden_states(token, cache, slot)[:, -1])


def filter_logits(logits, top_k=None, top_p=None):
    """(..., vocab) logits, -inf outside the top_k largest and the nucleus (fewest likeliest tokens reaching top_p)."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float('-inf'))
        logits = torch.full_like(logits, float('-inf')).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(B, vocab) logits -> (B,) next token ids."""
    if temperature == 0:  # in float32, the same token: PyTorch's CPU argmax is vectorised there, not in bfloat16
        return logits.float().argmax(dim=-1)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# -------------------------------------------------------------------- batches of rows of different lengths
def pad_rows(rows, pad_id, length=None, left=False):
    """Token-id lists of different lengths -> (B, length) tensor (length: the longest row's), each row padded with
    pad_id on the right, or on the left (batched generation: every row's last token in the last column)."""
    x = torch.full((len(rows), length or max(map(len, rows))), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        start = x.size(1) - len(row) if left else 0
        x[i, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
    return x


@torch.no_grad()
def generate_batch(model, prompts, end_id, max_new_tokens, temperature=0.0, generator=None):
    """Continuations (token-id lists) of several token-id prompts at once, in a KV cache; a row ends with end_id (if it
    ended). Prompts are left-padded: each row equals its continuation alone. temperature=0: greedy. Inside autocast."""
    device = model.lm_head.weight.device
    x = pad_rows(prompts, end_id, left=True).to(device)  # (B, longest)
    padding = torch.tensor([x.size(1) - len(ids) for ids in prompts], device=device)
    was_training = model.training
    model.eval()  # no dropout while answering
    out = model.generate(x, max_new_tokens, temperature=temperature, eos_id=end_id, padding=padding,
                         generator=generator)[:, x.size(1):].tolist()
    model.train(was_training)
    return [row[:row.index(end_id) + 1] if end_id in row else row for row in out]  # what follows the end is padding


def token_logprobs(model, x, y, temperature=1.0):
    """(log-probabilities of y's tokens (B, T), 0 where y is -100 (a prompt, the padding); that mask (B, T)) under the
    distribution at `temperature` (GRPO scores its samples at the temperature they were drawn at)."""
    logits, _ = model(x)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    mask = y != -100
    return logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask, mask


# -------------------------------------------------------------------- Muon
def orthogonalize(G, steps=5, dtype=torch.bfloat16):
    """The (semi-)orthogonal matrix nearest to G (U V^T of its SVD), approximately, by a quintic Newton-Schulz iteration
    (Keller Jordan's Muon coefficients), in bfloat16 where that is fast, else float32. G: (m, n), or (k, m, n)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype).reshape(-1, *G.shape[-2:])  # (k, m, n), k = 1 for a single matrix
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # work on the wide side: X @ X^T is then the smaller square
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A A: the scaling and the sum done by the matmul
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    return (X.mT if tall else X).reshape(G.shape).to(G.dtype)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon (momentum, then each 2-D update orthogonalized: every direction moves equally) for groups with use_muon,
    plain AdamW for the others. Under DDP each process orthogonalizes its share and gathers the others'
    (modded-nanogpt): the work is divided. Every process keeps all momentum buffers: any state_dict is the whole."""
    def __init__(self, groups):
        super().__init__(groups, dict(lr=0.02, momentum=0.95, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0))

    @torch.no_grad()
    def step(self, closure=None):
        gathers = []  # other processes' updates, in flight while this one orthogonalizes the next shape
        for group in self.param_groups:
            params = [p for p in group['params'] if p.grad is not None]
            if params and group['use_muon']:
                gathers += self.muon_step(group, params)
            elif params:
                self.adamw_step(group, params)
        for gather, params, updates, first, alpha in gathers:
            gather.wait()
            self.add_updates(params, updates, first, alpha)

    def muon_step(self, group, params):
        """Momentum (Nesterov), then one batched Newton-Schulz per weight shape (a few large matmuls beat many small).
        Returns the gathers launched (under DDP; on one process each shape's update is applied at once)."""
        lr, momentum, dtype = group['lr'], group['momentum'], group.get('ns_dtype', torch.bfloat16)
        rank, world = self.share_of_work(params)
        for p in params:
            if 'momentum_buffer' not in self.state[p]:
                self.state[p]['momentum_buffer'] = torch.zeros_like(p)
        torch._foreach_lerp_([self.state[p]['momentum_buffer'] for p in params], [p.grad for p in params], 1 - momentum)
        torch._foreach_mul_(params, 1 - lr * group['weight_decay'])
        by_shape = {}
        for p in params:
            by_shape.setdefault(p.shape, []).append(p)
        gathers, first = [], 0
        for (rows, cols), same in by_shape.items():
            # matrix i to (first + i) % world, round-robin across shapes: even shares (GPT-2's 4 x 12 on 8 GPUs: 6 each)
            mine = same[(rank - first) % world::world]
            alpha = -lr * max(1.0, rows / cols) ** 0.5
            if world == 1:
                self.add_updates(same, orthogonalize(self.nesterov(same, momentum), dtype=dtype)[None], 0, alpha)
                continue
            share = -(-len(same) // world)  # every process sends as many (ceil), the short ones padded with zeros
            local = torch.zeros(share, rows, cols, dtype=dtype, device=same[0].device)
            if mine:
                local[:len(mine)] = orthogonalize(self.nesterov(mine, momentum).to(dtype), dtype=dtype)
            updates = local.new_empty(world, share, rows, cols)  # process r's share in updates[r]
            gather = torch.distributed.all_gather(list(updates), local, async_op=True)
            gathers.append((gather, same, updates, first, alpha))
            first += len(same)
        return gathers

    def nesterov(self, params, momentum):
        """(k, rows, cols): the k gradients blended with their momentum (Nesterov), stacked."""
        grads, bufs = [p.grad for p in params], [self.state[p]['momentum_buffer'] for p in params]
        return torch.stack(torch._foreach_lerp(grads, bufs, momentum))

    @staticmethod
    def add_updates(params, updates, first, alpha):
        """p += alpha * its update, for the i-th of params at updates[(first + i) % world, i // world]."""
        updates = updates.to(params[0].dtype)
        world = updates.size(0)
        torch._foreach_add_(params, [updates[(first + i) % world, i // world] for i in range(len(params))], alpha=alpha)

    @staticmethod
    def share_of_work(params):
        """(rank, world size) of the processes sharing the Newton-Schulz work: under DDP all; (0, 1) on one process
        and under FSDP, whose parameters are DTensor shards, not whole matrices (train.py refuses Muon there)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return 0, 1
        from torch.distributed.tensor import DTensor
        if any(isinstance(p, DTensor) for p in params):
            return 0, 1
        return dist.get_rank(), dist.get_world_size()

    def adamw_step(self, group, params):
        """torch.optim.AdamW's functional update: fused (one pass over the group) where possible, else the default."""
        from torch.optim.adamw import adamw
        fused = all(p.device.type in FUSED_ADAMW_DEVICES for p in params)
        for p in params:
            state = self.state[p]
            if not state:
                state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            step_device = p.device if fused else torch.device('cpu')  # where AdamW keeps its step count
            if state['step'].device != step_device:  # (a checkpoint from a run on another device)
                state['step'] = state['step'].to(step_device, torch.float32)
        states = [self.state[p] for p in params]
        adamw(params, [p.grad for p in params], [s['exp_avg'] for s in states], [s['exp_avg_sq'] for s in states], [],
              [s['step'] for s in states], fused=fused or None, amsgrad=False, beta1=group['betas'][0],
              beta2=group['betas'][1], lr=group['lr'], weight_decay=group['weight_decay'], eps=group['eps'],
              maximize=False)


# -------------------------------------------------------------------- LoRA (appendix E)
class LoRALinear(nn.Linear):
    """A frozen Linear plus a trainable low-rank update, y = x W^T + b + (alpha / rank) x A^T B^T, B starting at 0.
    (The book's LinearWithLoRA scales by alpha; alpha / rank, as the LoRA paper, keeps the update's size any rank.)"""
    def __init__(self, base, rank, alpha):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device='meta')
        self.weight, self.bias = base.weight, base.bias
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        self.scale = alpha / rank
        self.lora_enabled = True  # False: the base model alone (DPO's reference without a copy)

    def forward(self, x):
        y = super().forward(x)
        return y + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale if self.lora_enabled else y

    def merged_weight(self):
        return (self.weight + self.scale * self.lora_B @ self.lora_A).detach()


def swap_modules(model, wanted, make):
    """Replace, in place, each submodule for which wanted(name, module) holds by make(module); returns model. By name,
    one at a time: a list of the modules would keep every replaced one alive (so quantizing after loading is cheap)."""
    for name in [name for name, m in model.named_modules() if name and wanted(name, m)]:
        parent, _, child = name.rpartition('.')
        parent = model.get_submodule(parent)
        setattr(parent, child, make(getattr(parent, child)))
    return model


def apply_lora(model, rank, alpha, targets=('c_attn', 'c_proj', 'c_fc')):
    """Freeze every parameter, wrap the named Linears with LoRA adapters (the only trainable ones). Returns model."""
    model.requires_grad_(False)
    return swap_modules(model, lambda name, m: name.rpartition('.')[2] in targets and type(m) is nn.Linear,
                        lambda linear: LoRALinear(linear, rank, alpha))


@contextmanager
def lora_disabled(model):
    """`with lora_disabled(model):` the model fine-tuning started from (DPO's, GRPO's reference) without a copy."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.lora_enabled = True


def merged_state_dict(model):
    """The state dict with every LoRA update folded into its plain weight (no lora_* keys): what a plain GPT loads."""
    sd = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            sd[name + '.weight'] = m.merged_weight()
            del sd[name + '.lora_A'], sd[name + '.lora_B']
    return sd


def merge_lora(model):
    """Replace every LoRALinear by a plain Linear holding W + (alpha/rank) B A, in place. Returns model."""
    def plain_linear(lora):
        plain = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None,
                          device=lora.weight.device, dtype=lora.weight.dtype)
        plain.load_state_dict({'weight': lora.merged_weight(), **({} if lora.bias is None else {'bias': lora.bias})})
        return plain.requires_grad_(lora.weight.requires_grad)
    return swap_modules(model, lambda name, m: isinstance(m, LoRALinear), plain_linear)
