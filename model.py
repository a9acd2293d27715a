"""
The whole GPT in one file (book chapters 3-4; GPT-2 weights ch. 5.5; LoRA appendix E).
GPT-2 exactly: learned token + position embeddings, pre-LayerNorm blocks, one fused qkv
projection, flash/SDPA causal attention, tanh-GELU MLP, output head tied to the token
embedding. Plus what a real user needs: KV-cache generation, GPT-2 weights in and out in the
Hugging Face layout (safetensors parsed here, no extra dependency), checkpoints, LoRA.
Imports only torch, numpy and the standard library (requests lazily, to download).
"""
import json
import math
import mmap
import os
import pickle
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

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
    padded_vocab_size: int = 0  # rows of the embedding and head; 0 = vocab_size. 50304 (a multiple of 64)
    # makes the head's matmuls tensor-core friendly, as nanoGPT and llm.c; the extra logits are cut off,
    # never sampled or scored
    # --- what turns GPT-2 into the Llama family (Llama 3.2, Qwen2.5, Qwen3, SmolLM2); the defaults are GPT-2's
    norm: str = 'layernorm'  # layernorm (GPT-2) | rmsnorm (Llama: no mean, no bias)
    norm_eps: float = 1e-5
    pos_emb: str = 'learned'  # learned (GPT-2's wpe table) | rope (rotary: positions rotate queries and keys)
    rope_theta: float = 10000.0  # RoPE's base wavelength (Llama 3: 500,000; Qwen: 1,000,000)
    rope_scaling: dict = None  # Llama 3's frequency scaling {factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings}, None = plain RoPE
    mlp: str = 'gelu'  # gelu (GPT-2: 4x wide, tanh GELU) | swiglu (Llama: silu(gate) * up)
    mlp_hidden: int = 0  # the MLP's hidden width; 0 = 4 * n_embd
    n_kv_head: int = 0  # key/value heads, shared by groups of query heads (grouped-query attention); 0 = n_head
    head_dim: int = 0  # 0 = n_embd // n_head (Qwen3's differs)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before RoPE (Qwen3)
    qkv_bias: bool = False  # biases on the q/k/v projection even without `bias` (Qwen2.5)
    tie_embeddings: bool = True  # the head shares the token embedding's weights (GPT-2, Llama 3.2 1B, Qwen3-0.6B)

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.mlp_hidden = self.mlp_hidden or 4 * self.n_embd


FUSED_ADAMW_DEVICES = ('cuda', 'cpu')  # where torch.optim.AdamW(fused=True) runs: one pass over all params

PRESETS = {  # the four GPT-2 sizes: n_layer, n_head, n_embd
    'gpt2': dict(n_layer=12, n_head=12, n_embd=768),          # 124M
    'gpt2-medium': dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    'gpt2-large': dict(n_layer=36, n_head=20, n_embd=1280),   # 774M
    'gpt2-xl': dict(n_layer=48, n_head=25, n_embd=1600),      # 1558M
}


def make_norm(config, dim):
    if config.norm == 'rmsnorm':
        return nn.RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def rope_frequencies(config):
    """RoPE's inverse wavelengths (head_dim // 2,): pair i of each head turns by pos * inv_freq[i].
    Llama 3 stretches the long wavelengths by `factor` (so the model reaches past the context it
    was pretrained with), keeps the short ones, and blends those in between."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    sc = config.rope_scaling
    if sc:
        old_context = sc['original_max_position_embeddings']
        wavelen = 2 * math.pi / inv_freq
        low_freq_wavelen, high_freq_wavelen = old_context / sc['low_freq_factor'], old_context / sc['high_freq_factor']
        smooth = (old_context / wavelen - sc['low_freq_factor']) / (sc['high_freq_factor'] - sc['low_freq_factor'])
        blended = (1 - smooth) * inv_freq / sc['factor'] + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_freq_wavelen, inv_freq / sc['factor'],
                               torch.where(wavelen < high_freq_wavelen, inv_freq, blended))
    return inv_freq


def apply_rope(x, cos, sin):
    """Rotate (B, nh, T, hs) queries or keys: pair (x[i], x[i + hs/2]) turns by the angle of its
    position (the Hugging Face "half split" layout, which the published weights expect)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CausalSelfAttention(nn.Module):  # ch03: multi-head attention (+ grouped-query attention, RoPE)

    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        assert self.n_head % self.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        self.sizes = [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim]
        # q, k and v in one matmul
        self.c_attn = nn.Linear(config.n_embd, sum(self.sizes), bias=config.bias or config.qkv_bias)
        self.c_proj = nn.Linear(self.sizes[0], config.n_embd, bias=config.bias)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)
        self.qk_norm = config.qk_norm
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.layer_idx = layer_idx  # which slot of a KVCache is ours

    def forward(self, x, rope=None, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.sizes, dim=2)
        # (B, T, heads * hs) -> (B, heads, T, hs): each head attends on its own; k and v have n_kv_head heads
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, n_kv_head, S, hs), S = cached + T
        S = k.size(2)
        dropout_p = self.dropout if self.training else 0.0
        gqa = self.n_kv_head != self.n_head  # each group of query heads reads one key/value head
        if S == T or T == 1:  # whole sequence (causal), or one new token that may see every cached one
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1, enable_gqa=gqa)
        else:  # a chunk after a cached prefix: query i sees keys 0 .. S-T+i
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):  # ch04: feed forward with GELU (or Llama's SwiGLU)

    def __init__(self, config):
        super().__init__()
        self.swiglu = config.mlp == 'swiglu'
        width = config.mlp_hidden * (2 if self.swiglu else 1)  # SwiGLU: gate and up in one matmul
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh')  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = self.gelu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):  # ch04: the transformer block, pre-norm

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), rope, kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class KVCache:
    """Keys and values of the tokens seen so far, for every layer, so that each new token
    costs one position of work instead of the whole sequence. Allocated once, for `length`
    positions, in the dtype the attention computes in. Under grouped-query attention it holds
    the n_kv_head shared heads, not copies per query head (Llama 3.2 1B: 4x smaller)."""

    def __init__(self, config, batch_size, device, dtype, length=None):
        shape = (config.n_layer, batch_size, config.n_kv_head, length or config.block_size, config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.pos = 0  # how many positions are filled

    def update(self, layer_idx, k, v):
        """Store (B, n_kv_head, T, hs) new keys/values of one layer; return all of its so far
        (B, n_kv_head, pos+T, hs)."""
        end = self.pos + k.size(2)
        self.k[layer_idx, :, :, self.pos:end] = k
        self.v[layer_idx, :, :, self.pos:end] = v
        if layer_idx == self.k.size(0) - 1:  # the last layer has written: advance
            self.pos = end
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]


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
            ln_f=make_norm(config, config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2 (saves 38.6M params at 124M)
        self.grad_checkpoint = False  # True: activation checkpointing per block (less memory, ~1/3 more compute)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith('c_proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_num_params(self):
        """All parameters, the tied head counted once (124,439,808 for GPT-2 124M)."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx, kv_cache=None):
        """(B, T) token ids -> (B, T, n_embd) final-normed states (the trunk, without the head)."""
        B, T = idx.size()
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos_emb == 'learned':
            x = x + self.transformer.wpe(pos)
        else:  # cos and sin of every (position, frequency) angle, (T, hs), in float32 whatever the weights' dtype
            angles = pos.float()[:, None] * rope_frequencies(self.config).to(idx.device)[None, :]
            angles = torch.cat((angles, angles), dim=-1)
            rope = (angles.cos().to(x.dtype), angles.sin().to(x.dtype))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.grad_checkpoint and self.training:  # keep only each block's input; recompute the rest in backward
                x = torch.utils.checkpoint.checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, kv_cache)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """logits (B, T, vocab_size) for every position; loss = cross-entropy against targets
        (B, T) where -100 marks positions to ignore, None without targets."""
        logits = self.lm_head(self.hidden_states(idx))  # (B, T, padded_vocab_size)
        V = self.config.vocab_size
        if logits.size(-1) > V:  # padding: -inf gets softmax 0, so it is never scored and gets no gradient.
            with torch.no_grad():  # in place and outside autograd, so the (B, T, V) logits are never copied
                logits[..., V:] = float('-inf')
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits[..., :V], loss  # with padding a view: use .reshape() rather than .view() on it

    def crop_block_size(self, block_size):
        """Use a shorter context than the weights were trained with (e.g. GPT-2's 1024 -> 256)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if self.config.pos_emb == 'learned':
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer='adamw', muon_lr=0.02,
                             muon_dtype=torch.bfloat16):
        """AdamW with weight decay on matrices and embeddings (>= 2-D) only, not on biases and
        LayerNorm gains; the fused kernel on CUDA and CPU (one pass over all params: on 2 CPU cores
        4x faster than the default per-tensor loop).
        optimizer='muon': Muon for the blocks' 2-D weights, AdamW for the rest (embeddings and
        head, biases, gains), as modded-nanogpt and nanochat. Each group's 'lr_scale' is its
        learning rate relative to learning_rate, for the schedule. muon_dtype: what its
        Newton-Schulz iteration computes in: bfloat16 where that is native (GPUs, recent CPUs),
        float32 where bfloat16 is emulated (AVX2 CPUs: 10x slower in bfloat16)."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if optimizer == 'adamw':
            groups = [{'params': [p for _, p in named if p.dim() >= 2], 'weight_decay': weight_decay},
                      {'params': [p for _, p in named if p.dim() < 2], 'weight_decay': 0.0}]
            return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in FUSED_ADAMW_DEVICES)
        if optimizer != 'muon':
            raise ValueError(f"unknown optimizer {optimizer!r}; use adamw or muon")
        hidden = [p for n, p in named if p.dim() == 2 and '.h.' in n]  # embeddings (wte = head) stay with AdamW
        embed = [p for n, p in named if p.dim() >= 2 and '.h.' not in n]
        rest = [p for _, p in named if p.dim() < 2]
        return MuonWithAdamW([
            {'params': hidden, 'use_muon': True, 'lr': muon_lr, 'lr_scale': muon_lr / learning_rate,
             'momentum': 0.95, 'weight_decay': 0.0, 'ns_dtype': muon_dtype},
            {'params': embed, 'use_muon': False, 'lr': learning_rate, 'betas': betas, 'weight_decay': weight_decay},
            {'params': rest, 'use_muon': False, 'lr': learning_rate, 'betas': betas, 'weight_decay': 0.0}])

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward): 6N + attention (PaLM appendix B)."""
        cfg = self.config
        N = self.get_num_params() - (self.transformer.wpe.weight.numel() if cfg.pos_emb == 'learned' else 0)
        return 6 * N + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size

    def estimate_mfu(self, tokens_per_s, peak_flops):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak."""
        return self.flops_per_token() * tokens_per_s / peak_flops if peak_flops else None

    # ---------------------------------------------------------------- generation (ch05)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                 use_cache=True, on_token=None, generator=None, kv_cache=None):
        """Append up to max_new_tokens to idx (B, T) and return it (B, T + n). One prefill of
        the prompt, then one token per step through the KV cache. temperature=0 is greedy.
        With eos_id, a row that has emitted it is padded with eos_id and generation stops
        once every row has. Past the cache's length (block_size at most) the window slides: the
        cache is refilled with the last half of it. Within the window the tokens equal those of
        use_cache=False (which recomputes the whole cropped sequence every step, as nanoGPT).
        on_token(next_ids (B,)) is called after each step, e.g. to stream text.
        kv_cache: a KVCache that already holds idx's first kv_cache.pos tokens (a chat's earlier
        turns): only the rest is prefilled, and it is left holding the text for the next call."""
        bs = self.config.block_size
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        cache, dev = kv_cache, idx.device.type
        if use_cache and cache is None:  # no bigger than this call needs (Llama 3.2's block_size is 131,072)
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.lm_head.weight.dtype
            cache = KVCache(self.config, idx.size(0), idx.device, dtype, min(bs, idx.size(1) + max_new_tokens))
        offset = 0  # the cache holds idx[:, offset:offset + cache.pos]
        if cache is not None:
            cache.pos = min(cache.pos, idx.size(1) - 1)  # at least the last token is fed again
        for _ in range(max_new_tokens):
            if not use_cache:
                x = self.hidden_states(idx[:, -bs:])
            else:
                if idx.size(1) - offset > cache.k.size(3):  # the window is full: start it again from the end
                    keep = cache.k.size(3) if cache.pos == 0 else cache.k.size(3) // 2  # (a long prompt: its end)
                    offset, cache.pos = idx.size(1) - keep, 0
                x = self.hidden_states(idx[:, offset + cache.pos:], cache)  # the prompt, then one token per step
            logits = self.lm_head(x[:, -1, :])[:, :self.config.vocab_size]  # (B, vocab): only the last position
            next_id = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_id = torch.where(done, torch.full_like(next_id, eos_id), next_id)
                done |= next_id == eos_id
            idx = torch.cat((idx, next_id[:, None]), dim=1)
            if on_token is not None:
                on_token(next_id)
            if eos_id is not None and bool(done.all()):
                break
        if cache is not None and offset:  # the window slid: what it holds no longer starts at idx's start
            cache.pos = 0
        return idx


def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit outside the top_k largest and outside the nucleus: the
    smallest set of most likely tokens whose probability reaches top_p. (..., vocab)"""
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
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# -------------------------------------------------------------------- Muon

def orthogonalize(G, steps=5, dtype=torch.bfloat16):
    """The (semi-)orthogonal matrix nearest to G (U V^T of its SVD), approximately, by a
    quintic Newton-Schulz iteration (coefficients from Keller Jordan's Muon), in bfloat16 as
    Muon does where that is fast, else float32."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    tall = G.size(0) > G.size(1)
    if tall:
        X = X.mT
    X = X / (X.norm() + 1e-7)  # spectral norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon (momentum, then each 2-D update orthogonalized: every direction moves equally) for
    groups with use_muon, plain AdamW for the others, in one optimizer so that train.py's loop,
    schedule, GradScaler and checkpoints treat it like AdamW."""

    def __init__(self, groups):
        super().__init__(groups, dict(lr=0.02, momentum=0.95, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd = group['lr'], group['weight_decay']
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group['use_muon']:
                    buf = state.setdefault('momentum_buffer', torch.zeros_like(p))
                    buf.lerp_(p.grad, 1 - group['momentum'])
                    nesterov = p.grad.lerp(buf, group['momentum'])
                    update = orthogonalize(nesterov, dtype=group.get('ns_dtype', torch.bfloat16))
                    p.mul_(1 - lr * wd).add_(update, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)
                else:
                    if not state:
                        state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    b1, b2 = group['betas']
                    state['step'] += 1
                    state['exp_avg'].lerp_(p.grad, 1 - b1)
                    state['exp_avg_sq'].lerp_(p.grad.square(), 1 - b2)
                    step = state['step'].item()
                    denom = (state['exp_avg_sq'] / (1 - b2 ** step)).sqrt_().add_(group['eps'])
                    p.mul_(1 - lr * wd).addcdiv_(state['exp_avg'], denom, value=-lr / (1 - b1 ** step))


# -------------------------------------------------------------------- GPU peak for MFU

_PEAK_FLOPS = [  # dense tensor-core FLOP/s from the vendors' data sheets: (name, bf16/fp16, float32 as TF32);
    # first match wins, so 'H100 NVL' and 'H100 PCIe' come before 'H100' (the SXM part). V100 and T4
    # have no TF32: their float32 figure is the plain FP32 peak.
    ('H200', 989e12, 494e12), ('H100 NVL', 835e12, 418e12), ('H100 PCIe', 756e12, 378e12),
    ('H100', 989e12, 494e12), ('H800', 989e12, 494e12), ('GH200', 989e12, 494e12),
    ('A100', 312e12, 156e12), ('A800', 312e12, 156e12), ('L40S', 362e12, 183e12), ('L40', 181e12, 90.5e12),
    ('A10G', 125e12, 62.5e12), ('A10', 125e12, 62.5e12), ('L4', 121e12, 60e12), ('A6000', 155e12, 77.4e12),
    ('V100', 125e12, 15.7e12), ('T4', 65e12, 8.1e12), ('4090', 165e12, 82.6e12), ('4080', 97.5e12, 48.7e12),
    ('4070', 58e12, 29e12), ('3090', 71e12, 35.6e12), ('3080', 59.5e12, 29.8e12),
]


def gpu_peak_flops(device, dtype='bfloat16'):
    """Peak FLOP/s of the CUDA device from its name for the dtype the matmuls run in (float32 runs
    as TF32, about half the bf16 rate), or None (CPU, MPS, a GPU not listed: give train.py
    --peak_flops then)."""
    if not str(device).startswith('cuda') or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    row = next((row for row in _PEAK_FLOPS if row[0] in name), None)
    return None if row is None else row[2] if dtype == 'float32' else row[1]


# -------------------------------------------------------------------- downloads

def download(url, path, sha256=None, desc=None, retries=4, timeout=30, backoff=1.0, headers=None):
    """Fetch url to path with requests, for real: streamed with a progress display, resumed
    and retried with backoff after a dropped connection or a 5xx, size-checked against
    Content-Length and sha256-checked where known. The bytes go to path.part and are renamed
    only when complete, so an interrupted download never leaves a file that looks finished.
    Returns path (at once if it already exists)."""
    import hashlib
    import requests
    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + '.part')
    desc = desc or path.name
    for attempt in range(retries):
        try:
            have = part.stat().st_size if part.exists() else 0
            ask = {'Accept-Encoding': 'identity', **(headers or {}), **({'Range': f'bytes={have}-'} if have else {})}
            with requests.get(url, stream=True, timeout=timeout, headers=ask) as r:
                if r.status_code == 416:  # our .part already holds everything (or is bogus): start over
                    part.unlink()
                    raise requests.ConnectionError("range not satisfiable")
                if r.status_code >= 500 or r.status_code == 429:
                    raise requests.ConnectionError(f"HTTP {r.status_code}")
                if r.status_code == 404:
                    raise FileNotFoundError(f"download of {url} failed: HTTP 404 Not Found; check the URL")
                if r.status_code >= 400:
                    raise OSError(f"download of {url} failed: HTTP {r.status_code} {r.reason}; check the URL")
                if r.status_code != 206:
                    have = 0  # the server ignored our Range: take the whole body again
                length = r.headers.get('Content-Length')
                total = have + int(length) if length is not None else None
                got, t0, shown = have, time.time(), 0.0
                with open(part, 'ab' if have else 'wb') as f:
                    for chunk in r.iter_content(chunk_size=1 << 16):
                        f.write(chunk)
                        got += len(chunk)
                        if time.time() - shown > 0.5:
                            shown = time.time()
                            _progress(desc, got, total, (got - have) / max(shown - t0, 1e-9))
                _progress(desc, got, total, (got - have) / max(time.time() - t0, 1e-9), end='\n')
            if total is not None and part.stat().st_size != total:
                raise requests.ConnectionError(f"got {part.stat().st_size:,} of {total:,} bytes")
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            if attempt == retries - 1:
                raise OSError(f"download of {url} failed after {retries} tries ({_first_line(e)}); "
                              f"check your connection, or put the file at {path} yourself") from None
            print(f"\n{desc}: {_first_line(e)}; retrying in {backoff * 2 ** attempt:.0f}s", file=sys.stderr)
            time.sleep(backoff * 2 ** attempt)
    if sha256 is not None:
        h = hashlib.sha256()
        with open(part, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                h.update(block)
        if h.hexdigest() != sha256:
            part.unlink()
            raise OSError(f"download of {url} has sha256 {h.hexdigest()[:12]}..., expected {sha256[:12]}...; "
                          "the file changed upstream or was corrupted in transit")
    os.replace(part, path)
    return path


def _progress(desc, got, total, rate, end=''):
    pct = f" {100 * got / total:5.1f}% of {total / 1e6:,.1f} MB" if total else ""
    print(f"\r{desc}: {got / 1e6:,.1f} MB{pct} at {rate / 1e6:.1f} MB/s", end=end, file=sys.stderr, flush=True)


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


# -------------------------------------------------------------------- safetensors, GPT-2 weights

_ST_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
              'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
              'U8': torch.uint8, 'BOOL': torch.bool}


def load_safetensors(path):
    """{name: tensor} from a .safetensors file: 8 bytes of little-endian header length, a JSON
    header {name: {dtype, shape, data_offsets}}, then the raw little-endian tensor bytes.
    The file is memory-mapped copy-on-write: read once, never written."""
    path = Path(path)
    try:
        with open(path, 'rb') as f:
            n = int.from_bytes(f.read(8), 'little')
            header = json.loads(f.read(n))
            size = os.fstat(f.fileno()).st_size
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        tensors = {}
        for name, info in header.items():
            if name == '__metadata__':
                continue
            dtype, (begin, end) = _ST_DTYPES[info['dtype']], info['data_offsets']
            numel = math.prod(info['shape'])
            if not (0 <= begin <= end and 8 + n + end <= size and end - begin == numel * dtype.itemsize):
                raise ValueError(f"tensor {name} lies outside the file or has the wrong size")
            t = torch.frombuffer(buf, dtype=dtype, count=numel, offset=8 + n + begin) if numel else torch.empty(0, dtype=dtype)
            tensors[name] = t.view(info['shape'])
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise ValueError(f"{path} is not a valid safetensors file ({_first_line(e)}); re-download or re-save it") from None
    return tensors


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as a .safetensors file (atomically: temp file + rename)."""
    inv = {v: k for k, v in _ST_DTYPES.items()}
    header, offset = {'__metadata__': {'format': 'pt', **(metadata or {})}}, 0
    flat = {}
    for name, t in tensors.items():
        t = t.detach().to('cpu').contiguous()
        flat[name] = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        header[name] = {'dtype': inv[t.dtype], 'shape': list(t.shape), 'data_offsets': [offset, offset + flat[name].numel()]}
        offset += flat[name].numel()
    head = json.dumps(header, separators=(',', ':')).encode()
    head += b' ' * (-len(head) % 8)  # the data starts 8-byte aligned
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        f.write(len(head).to_bytes(8, 'little'))
        f.write(head)
        for b in flat.values():
            f.write(b.numpy().data)
    os.replace(tmp, path)


# GPT-2 was written with "Conv1D" layers that store Linear weights transposed: (in, out).
_CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
HF_ENDPOINT = os.environ.get('HF_ENDPOINT', 'https://huggingface.co')
CACHE_DIR = Path(os.environ.get('LLM_CACHE_DIR', Path.home() / '.cache' / 'llm-from-scratch'))


def fetch_gpt2(name):
    """Download OpenAI's GPT-2 weights (Hugging Face layout) once into CACHE_DIR/name; later
    runs find them there and need no network. Returns the folder."""
    folder = CACHE_DIR / name
    for file in ('config.json', 'model.safetensors'):
        download(f"{HF_ENDPOINT}/openai-community/{name}/resolve/main/{file}", folder / file, desc=f"{name}/{file}")
    return folder


def gpt2_state_dict(tensors):
    """Hugging Face GPT-2 tensors -> our state dict. Both naming styles load: the hub's
    (`h.0.attn.c_attn.weight`) and recent transformers' (`transformer.h.0...`); the causal
    mask buffers (`attn.bias`, `attn.masked_bias`) and the tied `lm_head.weight` are skipped."""
    sd = {}
    for name, t in tensors.items():
        name = name.removeprefix('transformer.')
        if name.split('.')[-2:] in (['attn', 'bias'], ['attn', 'masked_bias']) or name == 'lm_head.weight':
            continue
        sd['transformer.' + name] = t.t() if name.endswith(_CONV1D) else t
    if 'transformer.wte.weight' in sd:
        sd['lm_head.weight'] = sd['transformer.wte.weight']  # tied
    return sd


def _gpt2_config(path, tensors):
    """GPTConfig from config.json beside the weights, else from the tensor shapes."""
    cfg_file = path.parent / 'config.json' if path.suffix == '.safetensors' else path / 'config.json'
    if cfg_file.is_file():
        with open(cfg_file, encoding='utf-8') as f:
            cfg = json.load(f)
        if cfg.get('model_type', 'gpt2') != 'gpt2':
            raise ValueError(f"{cfg_file}: model_type {cfg.get('model_type')!r} is not GPT-2")
        return GPTConfig(n_layer=cfg['n_layer'], n_head=cfg['n_head'], n_embd=cfg['n_embd'],
                         vocab_size=cfg['vocab_size'], block_size=cfg.get('n_positions', cfg.get('n_ctx')))
    wte = tensors.get('wte.weight', tensors.get('transformer.wte.weight'))
    wpe = tensors.get('wpe.weight', tensors.get('transformer.wpe.weight'))
    n_layer = len({k.removeprefix('transformer.').split('.')[1] for k in tensors if '.h.' in '.' + k.removeprefix('transformer.')})
    preset = next((p for p in PRESETS.values() if wte is not None and p['n_embd'] == wte.shape[1] and p['n_layer'] == n_layer), None)
    if preset is None:
        raise ValueError(f"{path}: no config.json beside the weights and the shapes match no GPT-2 size; add config.json")
    return GPTConfig(**preset, vocab_size=wte.shape[0], block_size=wpe.shape[0])


# Published models by short name (any other hub id works too, e.g. meta-llama/Llama-3.2-3B-Instruct)
ALIASES = {
    'llama-3.2-1b': 'meta-llama/Llama-3.2-1B', 'llama-3.2-1b-instruct': 'meta-llama/Llama-3.2-1B-Instruct',
    'llama-3.2-3b': 'meta-llama/Llama-3.2-3B', 'llama-3.2-3b-instruct': 'meta-llama/Llama-3.2-3B-Instruct',
    'qwen3-0.6b': 'Qwen/Qwen3-0.6B', 'qwen3-0.6b-base': 'Qwen/Qwen3-0.6B-Base', 'qwen3-1.7b': 'Qwen/Qwen3-1.7B',
    'qwen2.5-0.5b': 'Qwen/Qwen2.5-0.5B', 'qwen2.5-0.5b-instruct': 'Qwen/Qwen2.5-0.5B-Instruct',
    'smollm2-135m': 'HuggingFaceTB/SmolLM2-135M', 'smollm2-135m-instruct': 'HuggingFaceTB/SmolLM2-135M-Instruct',
    'smollm2-360m': 'HuggingFaceTB/SmolLM2-360M', 'smollm2-360m-instruct': 'HuggingFaceTB/SmolLM2-360M-Instruct',
}


def fetch_hub(repo, weights=True):
    """Download a hub model's config.json, tokenizer.json and weights (one model.safetensors, or
    the shards its model.safetensors.index.json names) once into CACHE_DIR/<repo>. Gated repos
    (Llama) need the license accepted on the hub and HF_TOKEN set. Returns the folder."""
    folder = CACHE_DIR / repo.replace('/', '--')
    token = os.environ.get('HF_TOKEN')
    headers = {'Authorization': f'Bearer {token}'} if token else None

    def get(file, optional=False):
        try:
            return download(f"{HF_ENDPOINT}/{repo}/resolve/main/{file}", folder / file, desc=f"{repo}/{file}", headers=headers)
        except FileNotFoundError:
            if optional:
                return None
            raise
        except OSError as e:
            if 'HTTP 401' in str(e) or 'HTTP 403' in str(e):
                raise OSError(f"{repo} is gated: accept its license on the hub, then set HF_TOKEN to an access token "
                              f"({'yours was refused' if token else 'none is set'})") from None
            raise
    get('config.json')
    get('tokenizer.json', optional=True)
    if not weights:
        return folder
    index = get('model.safetensors.index.json', optional=True)
    if index is None:
        get('model.safetensors')
    else:
        for shard in sorted(set(json.loads(index.read_text(encoding='utf-8'))['weight_map'].values())):
            get(shard)
    return folder


# The Llama family's tensor names for ours (block i: `transformer.h.{i}.X` <-> `model.layers.{i}.Y`).
# Ours fuse q, k, v into c_attn and gate, up into c_fc: their tensors are stacked along dim 0.
HF_NAMES = {
    'transformer.wte.weight': ['model.embed_tokens.weight'],
    'transformer.ln_f.weight': ['model.norm.weight'],
    'lm_head.weight': ['lm_head.weight'],
    'ln_1.weight': ['input_layernorm.weight'],
    'ln_2.weight': ['post_attention_layernorm.weight'],
    'attn.c_attn.weight': ['self_attn.q_proj.weight', 'self_attn.k_proj.weight', 'self_attn.v_proj.weight'],
    'attn.c_attn.bias': ['self_attn.q_proj.bias', 'self_attn.k_proj.bias', 'self_attn.v_proj.bias'],
    'attn.c_proj.weight': ['self_attn.o_proj.weight'],
    'attn.c_proj.bias': ['self_attn.o_proj.bias'],
    'attn.q_norm.weight': ['self_attn.q_norm.weight'],
    'attn.k_norm.weight': ['self_attn.k_norm.weight'],
    'mlp.c_fc.weight': ['mlp.gate_proj.weight', 'mlp.up_proj.weight'],
    'mlp.c_fc.bias': ['mlp.gate_proj.bias', 'mlp.up_proj.bias'],
    'mlp.c_proj.weight': ['mlp.down_proj.weight'],
    'mlp.c_proj.bias': ['mlp.down_proj.bias'],
}
ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM'}


def hf_names(name):
    """Our parameter name -> the hub's tensor names that make it up."""
    if name.startswith('transformer.h.'):
        i, rest = name.removeprefix('transformer.h.').split('.', 1)
        return [f'model.layers.{i}.{n}' for n in HF_NAMES[rest]]
    return HF_NAMES[name]


def llama_config(hf):
    """GPTConfig from a Llama / Qwen2 / Qwen3 config.json (the hub's rope_theta + rope_scaling, or
    transformers 5's rope_parameters)."""
    family = hf['model_type']
    rope = hf.get('rope_scaling') or hf.get('rope_parameters') or {}
    rope_type = rope.get('rope_type', rope.get('type', 'default'))
    if rope_type not in ('default', 'llama3'):
        raise ValueError(f"RoPE scaling {rope_type!r} is not supported (only Llama 3's and none)")
    scaling = None
    if rope_type == 'llama3':
        scaling = {k: rope[k] for k in ('factor', 'low_freq_factor', 'high_freq_factor')}
        scaling['original_max_position_embeddings'] = rope.get('original_max_position_embeddings', hf['max_position_embeddings'])
    if hf.get('use_sliding_window'):
        raise ValueError("sliding-window attention (use_sliding_window) is not supported")
    n_head = hf['num_attention_heads']
    return GPTConfig(
        block_size=hf['max_position_embeddings'], vocab_size=hf['vocab_size'], n_layer=hf['num_hidden_layers'],
        n_head=n_head, n_embd=hf['hidden_size'], n_kv_head=hf.get('num_key_value_heads') or n_head,
        head_dim=hf.get('head_dim') or hf['hidden_size'] // n_head, bias=bool(hf.get('attention_bias') and hf.get('mlp_bias')),
        qkv_bias=family == 'qwen2' or bool(hf.get('attention_bias')), qk_norm=family == 'qwen3',
        norm='rmsnorm', norm_eps=hf.get('rms_norm_eps', 1e-6), pos_emb='rope',
        rope_theta=hf.get('rope_theta', rope.get('rope_theta', 10000.0)), rope_scaling=scaling,
        mlp='swiglu', mlp_hidden=hf['intermediate_size'], tie_embeddings=hf.get('tie_word_embeddings', False))


class SafetensorsFiles:
    """The tensors of one or more .safetensors files, read on demand: the header of each file is
    parsed up front, the bytes of a tensor only when it is copied into the model. So loading
    holds the weights once, in the model (the book's memory-efficient loading bonus)."""

    def __init__(self, paths):
        self.where = {}  # name -> (path, dtype, shape, byte offset)
        for path in paths:
            with open(path, 'rb') as f:
                n = int.from_bytes(f.read(8), 'little')
                try:
                    header = json.loads(f.read(n))
                except ValueError:
                    raise ValueError(f"{path} is not a valid safetensors file (bad header); re-download it") from None
            for name, info in header.items():
                if name != '__metadata__':
                    self.where[name] = (path, _ST_DTYPES[info['dtype']], info['shape'], 8 + n + info['data_offsets'][0])

    def copy_into(self, name, out):
        """Read tensor `name` into the tensor `out` (its shape; its dtype, converting if they differ)."""
        path, dtype, shape, offset = self.where[name]
        if list(out.shape) != list(shape):
            raise ValueError(f"{name} has shape {tuple(shape)} in {path.name}, the model expects {tuple(out.shape)}")
        target = out if out.dtype == dtype else torch.empty(shape, dtype=dtype)
        with open(path, 'rb') as f:
            f.seek(offset)
            if f.readinto(target.view(torch.uint8).numpy() if target.numel() else bytearray()) != target.numel() * dtype.itemsize:
                raise ValueError(f"{path} is truncated at {name}; re-download it")
        if target is not out:
            out.copy_(target)


def weight_files(folder):
    index = folder / 'model.safetensors.index.json'
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding='utf-8'))['weight_map'].values()))
        return [folder / s for s in shards]
    return [folder / 'model.safetensors']


def load_llama(cls, folder, hf, dtype=None, **overrides):
    """A Llama / Qwen2 / Qwen3 / SmolLM2 model from a Hugging Face folder. Built on the meta device
    (no memory, no random init), then each parameter is filled straight from the files."""
    config = llama_config(hf)
    config.dropout = overrides.get('dropout', 0.0)
    files = SafetensorsFiles([p for p in weight_files(folder) if p.is_file()] or [folder / 'model.safetensors'])
    file_dtype = next(iter(files.where.values()))[1]
    with torch.device('meta'):
        model = cls(config)
    model = model.to(dtype or file_dtype).to_empty(device='cpu')
    if config.tie_embeddings:  # to_empty gives every parameter new storage: tie again
        model.transformer.wte.weight = model.lm_head.weight
    with torch.no_grad():
        for name, param in model.named_parameters():  # the tied head is not listed twice
            parts = hf_names(name)
            missing = [p for p in parts if p not in files.where]
            if missing:
                raise ValueError(f"{folder} lacks {missing[0]}; is it a complete {hf['model_type']} checkpoint?")
            row = 0
            for part in parts:  # q, k, v (or gate, up) one after the other down the rows
                rows = files.where[part][2][0]
                files.copy_into(part, param[row:row + rows])
                row += rows
    return model


def is_hub_name(name):
    """A short name (qwen3-0.6b) or a hub id (Qwen/Qwen3-0.6B) rather than a local path."""
    return str(name).lower() in ALIASES or (str(name).count('/') == 1 and not Path(name).exists())


def pretrained_path(name_or_path, weights=True):
    """The local folder (or .safetensors file) of a GPT-2 size, hub name or path, downloaded first if need be."""
    name_or_path = str(name_or_path)
    if name_or_path in PRESETS:
        return fetch_gpt2(name_or_path)
    if is_hub_name(name_or_path):
        return fetch_hub(ALIASES.get(name_or_path.lower(), name_or_path), weights)
    path = Path(name_or_path)
    if not (path.is_dir() or (path.is_file() and path.suffix == '.safetensors')):
        raise FileNotFoundError(f"{name_or_path}: not a GPT-2 size ({', '.join(PRESETS)}), a model name "
                                f"({', '.join(list(ALIASES)[:3])}, ...), a hub id, a folder with "
                                "model.safetensors + config.json, or a .safetensors file")
    return path


def _from_pretrained(cls, name_or_path, dtype=None, **overrides):
    """GPT-2 sizes, hub ids or short names of the Llama family, or a local folder / .safetensors
    file in the Hugging Face layout. dtype: the weights' dtype (None: as the files hold them)."""
    bad = set(overrides) - {'block_size', 'dropout'}
    if bad:
        raise ValueError(f"from_pretrained can only override block_size and dropout, not {sorted(bad)}")
    path = pretrained_path(name_or_path)
    cfg_file = path / 'config.json' if path.is_dir() else path.parent / 'config.json'
    hf = json.loads(cfg_file.read_text(encoding='utf-8')) if cfg_file.is_file() else {'model_type': 'gpt2'}
    if hf.get('model_type') in ARCHITECTURES:
        model = load_llama(cls, path if path.is_dir() else path.parent, hf, dtype, **overrides)
    elif hf.get('model_type') != 'gpt2':
        raise ValueError(f"{cfg_file}: model_type {hf.get('model_type')!r} is not supported "
                         f"(gpt2, {', '.join(ARCHITECTURES)})")
    else:
        weights = path / 'model.safetensors' if path.is_dir() else path
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found; a GPT-2 folder holds model.safetensors and config.json")
        tensors = load_safetensors(weights)
        config = _gpt2_config(path, tensors)
        config.dropout = overrides.get('dropout', 0.0)
        model = cls(config)
        load_state_dict_checked(model, gpt2_state_dict(tensors), str(weights))
        if dtype is not None:
            model.to(dtype)
    block_size = overrides.get('block_size', model.config.block_size)
    if block_size > model.config.block_size:
        raise ValueError(f"block_size {block_size} is longer than the {model.config.block_size} positions the weights have")
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)
    return model


def load_state_dict_checked(model, sd, source):
    """load_state_dict with one readable line for missing, unexpected or mis-shaped tensors."""
    sd = {k.removeprefix('_orig_mod.').removeprefix('module.'): v for k, v in sd.items()}
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or extra or shapes:
        what = '; '.join(f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                         for label, items in (('missing', missing), ('unexpected', extra), ('shape', shapes)) if items)
        raise ValueError(f"{source} does not fit this model ({what})")
    with torch.no_grad():
        model.load_state_dict(sd)


def _save_pretrained(self, folder, tokenizer_json=None):
    """Write config.json + model.safetensors as transformers writes this family (GPT2LMHeadModel:
    Conv1D weights transposed back, zero biases where this model has none; Llama/Qwen: the hub's
    names, q/k/v and gate/up split apart again), plus tokenizer.json when given its text, so the
    folder loads here, in transformers and anywhere else such checkpoints are read."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_json is not None:
        (folder / 'tokenizer.json').write_text(tokenizer_json, encoding='utf-8')
    cfg = self.config
    if cfg.pos_emb == 'rope':
        return save_llama(self, folder)
    tensors = {}
    for name, t in merged_state_dict(self).items():
        if name == 'transformer.wte.weight':
            t = t[:cfg.vocab_size].contiguous()  # without the padding rows: the real vocabulary
        if name != 'lm_head.weight':  # tied to wte
            tensors[name] = t.t() if name.endswith(_CONV1D) else t
    if not cfg.bias:  # the layout has biases everywhere; zeros are the same model
        for name, m in self.named_modules():
            if name != 'lm_head' and isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is None:
                n = m.out_features if isinstance(m, nn.Linear) else m.normalized_shape[0]
                tensors[name + '.bias'] = torch.zeros(n, dtype=m.weight.dtype)
    save_safetensors(tensors, folder / 'model.safetensors')
    hf_config = dict(architectures=['GPT2LMHeadModel'], model_type='gpt2', vocab_size=cfg.vocab_size,
                     n_positions=cfg.block_size, n_ctx=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_inner=None, activation_function='gelu_new', resid_pdrop=cfg.dropout,
                     embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, layer_norm_epsilon=1e-5,
                     initializer_range=0.02, bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1,
                     tie_word_embeddings=True)
    tmp = folder / 'config.json.tmp'
    tmp.write_text(json.dumps(hf_config, indent=2), encoding='utf-8')
    os.replace(tmp, folder / 'config.json')


def save_llama(model, folder):
    cfg = model.config
    if cfg.norm != 'rmsnorm' or cfg.mlp != 'swiglu':
        raise ValueError("only GPT-2 (learned positions, LayerNorm, GELU) or the Llama family (RoPE, RMSNorm, "
                         "SwiGLU) can be saved in a Hugging Face layout")
    family = 'qwen3' if cfg.qk_norm else 'qwen2' if cfg.qkv_bias and not cfg.bias else 'llama'
    sd = merged_state_dict(model)
    tensors = {}
    for name, t in sd.items():
        if name == 'lm_head.weight' and cfg.tie_embeddings:
            continue
        if name in ('transformer.wte.weight', 'lm_head.weight'):
            t = t[:cfg.vocab_size]  # without the padding rows
        parts = hf_names(name)
        sizes = model.transformer.h[0].attn.sizes if len(parts) == 3 else [t.size(0) // len(parts)] * len(parts)
        for part, piece in zip(parts, t.split(sizes)):
            tensors[part] = piece.contiguous()
    save_safetensors(tensors, folder / 'model.safetensors')
    dtype = str(sd['transformer.wte.weight'].dtype).removeprefix('torch.')
    hf = dict(architectures=[ARCHITECTURES[family]], model_type=family, vocab_size=cfg.vocab_size,
              hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
              num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
              max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, hidden_act='silu',
              rope_theta=cfg.rope_theta, rope_scaling=dict(rope_type='llama3', **cfg.rope_scaling) if cfg.rope_scaling else None,
              tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.bias, mlp_bias=cfg.bias,
              attention_dropout=0.0, use_sliding_window=False, torch_dtype=dtype)
    tmp = folder / 'config.json.tmp'
    tmp.write_text(json.dumps(hf, indent=2), encoding='utf-8')
    os.replace(tmp, folder / 'config.json')


GPT.from_pretrained = classmethod(_from_pretrained)
GPT.save_pretrained = _save_pretrained


# -------------------------------------------------------------------- checkpoints

def save_checkpoint(ckpt, path):
    """torch.save, atomically: a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location='cpu'):
    """A checkpoint dict (path may be its out_dir). weights_only=True: loading never runs code
    from the file; a hostile, truncated or foreign file raises ValueError with one line."""
    path = Path(path)
    if path.suffix != '.pt':
        path = path / 'ckpt.pt'
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train one first (python train.py) or use --init_from=gpt2")
    try:
        with warnings.catch_warnings():  # a foreign pickle may warn about its protocol: the error below says it all
            warnings.simplefilter('ignore')
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if 'Weights only load failed' not in str(e):  # e.g. a truncated legacy pickle
            raise ValueError(f"{path} is not a loadable checkpoint ({_first_line(e)}); it may be truncated") from None
        # PyTorch's own message advises weights_only=False here: exactly what must not be done with such a file
        raise ValueError(f"{path} holds Python objects beyond tensors and plain data, so it was refused unread: "
                         "it is not a checkpoint of this project; load only files you made or trust") from None
    except Exception as e:
        raise ValueError(f"{path} is not a loadable checkpoint ({_first_line(e)}); "
                         "it may be truncated or written by another program; re-save or re-train it") from None
    if not isinstance(ckpt, dict) or not {'model', 'model_args'} <= set(ckpt):
        raise ValueError(f"{path} is not a checkpoint of this project (it lacks 'model' and 'model_args')")
    return ckpt


def model_from_checkpoint(ckpt, source='checkpoint', **overrides):
    """GPT built from a checkpoint's model_args and weights (dropout/block_size overridable)."""
    try:
        config = GPTConfig(**{**ckpt['model_args'], **overrides})
    except TypeError as e:
        raise ValueError(f"{source}: bad model_args ({e})") from None
    model = GPT(config)
    load_state_dict_checked(model, ckpt['model'], source)
    return model


def load_pretrained(init_from, dtype=None, **overrides):
    """(model, info) from a GPT-2 size, a checkpoint of ours (a ckpt.pt or the folder holding
    it), a Llama-family name or hub id, or Hugging Face-layout weights (a folder or .safetensors
    file): the starting point every script accepts. info: {'tokenizer': what
    prepare_data.get_tokenizer takes (a name, the model's folder, or the spec a checkpoint
    carries), 'prompt_style': the instruction template a fine-tuned checkpoint was trained with,
    or None}."""
    path = Path(init_from)
    if init_from not in PRESETS and not is_hub_name(init_from) and (path.suffix == '.pt' or (path / 'ckpt.pt').is_file()):
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, str(path), **{k: v for k, v in overrides.items() if k == 'dropout'})
        if overrides.get('block_size', model.config.block_size) < model.config.block_size:
            model.crop_block_size(overrides['block_size'])
        return model, {'tokenizer': ckpt.get('tokenizer', 'gpt2'), 'prompt_style': ckpt.get('prompt_style')}
    model = GPT.from_pretrained(init_from, dtype=dtype, **overrides)
    folder = pretrained_path(init_from)
    folder = folder if folder.is_dir() else folder.parent
    if (folder / 'tokenizer.json').is_file():
        tokenizer = str(folder)
    else:
        tokenizer = 'bytes' if model.config.vocab_size == 257 else 'gpt2'
    return model, {'tokenizer': tokenizer, 'prompt_style': None}


# -------------------------------------------------------------------- LoRA (appendix E)

class LoRALinear(nn.Linear):
    """A frozen Linear plus a trainable low-rank update: y = x W^T + b + (alpha / rank) x A^T B^T.
    A starts Kaiming-uniform and B at zero, so the model starts out unchanged. (The book's
    LinearWithLoRA scales by alpha alone; alpha / rank, as in the LoRA paper, keeps the update's
    size independent of the rank.) Keeps the Linear's parameter names, so state dicts match."""

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
        if self.lora_enabled:
            y = y + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale
        return y

    def merged_weight(self):
        return (self.weight + self.scale * self.lora_B @ self.lora_A).detach()


def apply_lora(model, rank, alpha, targets=('c_attn', 'c_proj', 'c_fc')):
    """Freeze every parameter and wrap the named Linear layers with LoRA adapters (the only
    trainable parameters afterwards, until you unfreeze e.g. a new head). Returns model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear(child, rank, alpha))
    return model


def set_lora_enabled(model, enabled):
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_enabled = enabled


def merged_state_dict(model):
    """The state dict with every LoRA update folded into its plain weight (no lora_* keys):
    what a plain GPT loads."""
    sd = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            sd[name + '.weight'] = m.merged_weight()
            del sd[name + '.lora_A'], sd[name + '.lora_B']
    return sd


def merge_lora(model):
    """Replace every LoRALinear by a plain Linear holding W + (alpha/rank) B A, in place."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    plain.weight.copy_(child.merged_weight())
                    if child.bias is not None:
                        plain.bias.copy_(child.bias)
                plain.weight.requires_grad_(child.weight.requires_grad)
                setattr(module, child_name, plain)
    return model
