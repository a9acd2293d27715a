"""
The whole GPT in one file (book chapters 3-4; LoRA appendix E; the "GPT to Llama" bonus).
GPT-2 exactly: learned token + position embeddings, pre-LayerNorm blocks, one fused qkv
projection, flash/SDPA causal attention, tanh-GELU MLP, output head tied to the token
embedding. The Llama family (Llama 3.2, Qwen2.5, Qwen3, SmolLM2) is the same class with other
GPTConfig fields: RMSNorm, rotary positions, SwiGLU, grouped-query attention. Plus what a real
user needs: KV-cache generation, LoRA, Muon. Files (our checkpoints, published GPT-2 and Llama
weights, downloads) are weights.py's job; it imports this file, never the other way round.
Imports only torch and the standard library.
"""
import copy
import math
from contextlib import contextmanager
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


def one_query_attention(q, k, v, mask=None):
    """Attention of one new token to S cached keys, in plain matmuls: on a CPU in bfloat16 PyTorch's SDPA kernel
    costs ten times as much a key at one query (RESULTS.md), though below ~64 keys its fixed cost is the smaller.
    q (B, nh, 1, hs), k and v (B, n_kv_head, S, hs), mask None or a bool (B or 1, 1, 1, S) -> (B, nh, 1, hs)."""
    B, nh, _, hs = q.shape
    # the query heads that read each key/value head, as rows, scaled before the matmul (float16 cannot overflow then)
    rows = q.reshape(B, k.size(1), nh // k.size(1), hs) * hs ** -0.5
    # keys times queries, then turned: the cached keys are a slice of the cache's buffer, which rows @ k^T would
    # first copy whole
    scores = (k @ rows.transpose(-2, -1)).transpose(-2, -1).float()  # (B, n_kv_head, nh / n_kv_head, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float('-inf'))
    return (scores.softmax(dim=-1).to(v.dtype) @ v).view(B, nh, 1, hs)  # softmax in float32, as SDPA's


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

    def forward(self, x, rope=None, kv_cache=None, mask=None, slot=None):
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
            k, v = kv_cache.update(self.layer_idx, k, v, slot)  # (B, n_kv_head, S, hs): the cached keys and values too
        dropout_p = self.dropout if self.training else 0.0
        gqa = self.n_kv_head != self.n_head  # each group of query heads reads one key/value head
        # no mask: the whole sequence (causal), or one new token that may see every cached one; else the
        # mask says which keys each query sees (a chunk after a cached prefix, padding, the static cache)
        if T == 1 and not self.training and q.device.type == 'cpu' and q.dtype != torch.float32 and k.size(2) > 64:
            y = one_query_attention(q, k, v, mask)  # decoding on a CPU in bf16/fp16: SDPA's kernel is slow there
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                               is_causal=mask is None and T > 1, enable_gqa=gqa)
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

    def forward(self, x, rope=None, kv_cache=None, mask=None, slot=None):
        x = x + self.attn(self.ln_1(x), rope, kv_cache, mask, slot)
        x = x + self.mlp(self.ln_2(x))
        return x


class KVCache:
    """Keys and values of the tokens seen so far, for every layer, so that each new token
    costs one position of work instead of the whole sequence (the book's ch04 bonus KV cache:
    keys and values appended per layer, read back with the new ones). Allocated once, for `length`
    slots, in the dtype the attention computes in; a fixed shape, so a compiled decoding step is
    one graph. Under grouped-query attention it holds the n_kv_head shared heads, not copies per
    query head (Llama 3.2 1B: 4x smaller).
    padding: (B,) how many left-padding tokens open each row of the text (prompts of different
    lengths in one batch), None when no row is padded. Padding is never attended to, and a row's
    positions count from its first real token, so each row reads as it would alone.
    Its fields are written here and by GPT only; callers ask: restart, truncate."""

    def __init__(self, config, batch_size, device, dtype, length=None, padding=None):
        self.length = min(length or config.block_size, config.block_size)  # no position lies beyond block_size
        shape = (batch_size, config.n_kv_head, self.length, config.head_dim)
        # one tensor per layer, so that a compiled step writes each in place (a slice of one big tensor
        # would be copied whole); zeros, not empty: a masked-out slot gets weight 0, and 0 * NaN is NaN
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.padding = padding
        # the compiled step's write slot, one tensor refilled each step: a Python int would recompile per step
        self.step_slot = torch.zeros(1, dtype=torch.long, device=device)
        self.restart(0)

    def update(self, layer_idx, k, v, slot=None):
        """Store (B, n_kv_head, T, hs) new keys/values of one layer after the `filled` slots and return
        all of its so far (B, n_kv_head, filled+T, hs); in the compiled one-token step, write them at
        the tensor `slot` and return every slot (the mask hides the empty ones)."""
        if slot is not None:
            self.k[layer_idx].index_copy_(2, slot, k)
            self.v[layer_idx].index_copy_(2, slot, v)
            return self.k[layer_idx], self.v[layer_idx]
        end = self.filled + k.size(2)
        self.k[layer_idx][:, :, self.filled:end] = k
        self.v[layer_idx][:, :, self.filled:end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def positions_and_mask(self, T, slot=None):
        """For T new tokens: their positions in the text (1 or B, T), and which slots each may attend
        to, a bool mask (1 or B, 1, T, slots), or None where plain causal attention is exact (SDPA's fast path)."""
        device = self.k[0].device
        if slot is not None:  # one token at slot `slot`, every slot given to attention
            query_slots, key_slots = slot.view(1, 1), torch.arange(self.length, device=device)
        else:
            query_slots = torch.arange(self.filled, self.filled + T, device=device)[None]
            key_slots = torch.arange(self.filled + T, device=device)
            if self.padding is None and (T == 1 or self.filled == 0):
                return query_slots, None
        sees = key_slots <= query_slots[..., None]  # causal: (1, T, S)
        if self.padding is None:
            return query_slots, sees[:, None]
        pads = self.window_padding[:, None, None]  # (B, 1, 1)
        # a padding query sees itself: no row of the mask is empty (a NaN)
        sees = sees & ((key_slots >= pads) | (key_slots == query_slots[..., None]))
        return (query_slots - pads[:, :, 0]).clamp(min=0), sees[:, None]

    def restart(self, offset=0):
        """Empty the cache; it will hold the text from token `offset` on (the window slides)."""
        self.filled = 0  # how many slots hold a token
        self.offset = offset  # which token of the text is in slot 0 (> 0 once the window has slid)
        # the padding left in the window, as a tensor: a compiled step reading the int offset would
        # recompile at every slide
        self.window_padding = None if self.padding is None else (self.padding - offset).clamp(min=0)

    def truncate(self, n):
        """Keep only the first n filled slots: the next text shares just those tokens with the last."""
        self.filled = min(self.filled, n)

    def repeat_rows(self, repeats):
        """A cache whose rows are this one's, row i repeated repeats[i] times: texts that continue one shared start
        (eval.py's choices after their context) read it from there, computed once."""
        new, repeats = copy.copy(self), torch.as_tensor(repeats, device=self.k[0].device)
        new.k, new.v = ([t.repeat_interleave(repeats, dim=0) for t in kv] for kv in (self.k, self.v))
        if self.padding is not None:
            new.padding, new.window_padding = (t.repeat_interleave(repeats) for t in (self.padding,
                                                                                    self.window_padding))
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
            ln_f=make_norm(config, config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        if config.pos_emb == 'rope':  # cos and sin of every (position, frequency) angle, (block_size, hs), built once
            # on the model's device; not saved (persistent=False): they follow from the config
            self.register_buffer('rope_cos', torch.empty(config.block_size, config.head_dim), persistent=False)
            self.register_buffer('rope_sin', torch.empty(config.block_size, config.head_dim), persistent=False)
            self.init_rope()
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2 (saves 38.6M params at 124M)
        self.grad_checkpoint = False  # True: activation checkpointing per block (less memory, ~1/3 more compute)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith('c_proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @torch.no_grad()
    def init_rope(self):
        """Fill the RoPE tables (again after a meta-device build, which leaves buffers empty), computed in
        float32 whatever the buffers' dtype."""
        angles = torch.arange(self.config.block_size, dtype=torch.float32, device=self.rope_cos.device)[:, None] \
            * rope_frequencies(self.config).to(self.rope_cos.device)[None, :]  # (block_size, hs / 2)
        angles = torch.cat((angles, angles), dim=-1)  # the half-split layout: pair (i, i + hs/2) shares an angle
        self.rope_cos.copy_(angles.cos())
        self.rope_sin.copy_(angles.sin())

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_num_params(self):
        """All parameters, the tied head counted once (124,439,808 for GPT-2 124M)."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx, kv_cache=None, slot=None):
        """(B, T) token ids -> (B, T, n_embd) final-normed states (the trunk, without the head).
        With a kv_cache, idx continues what it holds, and it then holds idx too; with a slot (a tensor),
        idx is one token written at that slot (the compiled decoding step)."""
        B, T = idx.size()
        filled = 0 if kv_cache is None or slot is not None else kv_cache.filled
        if filled + T > self.config.block_size:
            raise ValueError(f"sequence of {filled + T} tokens is longer than block_size {self.config.block_size}")
        if kv_cache is None:
            pos, mask = torch.arange(T, device=idx.device)[None], None  # (1, T)
        else:
            pos, mask = kv_cache.positions_and_mask(T, slot)  # (1 or B, T)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos_emb == 'learned':
            x = x + self.transformer.wpe(pos)
        else:  # cos and sin of each position's angles, (1 or B, 1, T, hs): they broadcast over the heads
            rope = (self.rope_cos[pos].to(x.dtype)[:, None], self.rope_sin[pos].to(x.dtype)[:, None])
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.grad_checkpoint and self.training:  # keep only each block's input; recompute the rest in backward
                x = torch.utils.checkpoint.checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, kv_cache, mask, slot)
        if kv_cache is not None and slot is None:
            kv_cache.filled += T
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
        else:
            self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer='adamw', muon_lr=0.02,
                             muon_dtype=torch.bfloat16):
        """AdamW with weight decay on matrices and embeddings (>= 2-D) only, not on biases and norm gains; the
        fused kernel on CUDA and CPU (one pass over all params, not a loop over tensors). optimizer='muon': Muon
        for the blocks' 2-D weights, AdamW for the rest (embeddings and head, biases, gains), as modded-nanogpt
        and nanochat. Muon's matrices decay too, the AdamW way (p *= 1 - lr * weight_decay, as Moonshot's "Muon
        is Scalable"): at Muon's larger lr a real pull toward zero, which a run that reads its data several times
        needs (RESULTS.md, "Weight decay"). Each group's 'lr_scale' is its lr relative to learning_rate, for the
        schedule. muon_dtype: what Newton-Schulz computes in, bfloat16 where that is native, else float32."""
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
             'momentum': 0.95, 'weight_decay': weight_decay, 'ns_dtype': muon_dtype},
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
                 use_cache=True, on_token=None, generator=None, kv_cache=None, padding=None, decode_step=None):
        """Append up to max_new_tokens to idx (B, T) and return it (B, T + n): the book's ch05
        generate with a KV cache (the prompt is computed once, then one token per step).
        temperature=0 is greedy. With eos_id, a row that has emitted it is padded with eos_id, and
        generation stops once every row has. Within block_size the tokens equal use_cache=False's
        (which recomputes the whole cropped sequence every step, as nanoGPT).
        on_token(next_ids (B,)) is called after each step, e.g. to stream text.
        kv_cache: a KVCache that already holds idx's first kv_cache.filled tokens (a chat's earlier
        turns): only the rest is computed, and it is left holding the text for the next call.
        padding: (B,) left-padding tokens in each row of idx (prompts of different lengths).
        decode_step: torch.compile(model.decode_step) to run each one-token step as one fixed graph."""
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
            # whether every row is done needs the device to finish: ask every 8 tokens (or when the
            # text is streamed, which waits for each token anyway)
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
        """(B, padded vocab) logits for the token after text (B, T), computing only the tokens the cache
        lacks. When they do not fit, the window slides: the cache restarts from the last half of it (a
        prompt longer than the cache: from its last cache.length tokens)."""
        if text.size(1) - cache.offset > cache.length:
            keep = cache.length if cache.filled == 0 else cache.length // 2
            cache.restart(offset=text.size(1) - keep)
        new = text[:, cache.offset + cache.filled:]
        if decode_step is not None and new.size(1) == 1:
            cache.step_slot.fill_(cache.filled)
            new = new.clone(memory_format=torch.contiguous_format)  # the same strides every call: one graph
            logits = decode_step(new, cache, cache.step_slot)
            cache.filled += 1
            return logits
        return self.lm_head(self.hidden_states(new, cache)[:, -1])  # the prompt: a variable length, computed eagerly

    def decode_step(self, token, cache, slot):
        """(B, 1) token -> (B, padded vocab) logits with every shape fixed: the cache is read whole and
        written at `slot` (a tensor), so torch.compile makes one graph (CUDA graphs with
        mode='reduce-overhead') that serves every step."""
        return self.lm_head(self.hidden_states(token, cache, slot)[:, -1])


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
        # in float32, the same token: PyTorch's CPU argmax is vectorised there, not in bfloat16
        return logits.float().argmax(dim=-1)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# -------------------------------------------------------------------- batches of rows of different lengths

def pad_rows(rows, pad_id, length=None, left=False):
    """Token-id lists of different lengths -> (B, length) tensor (length: the longest row's), each row padded
    with pad_id on the right, or on the left (batched generation: every row's last token in the last column)."""
    x = torch.full((len(rows), length or max(map(len, rows))), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        start = x.size(1) - len(row) if left else 0
        x[i, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
    return x


@torch.no_grad()
def generate_batch(model, prompts, end_id, max_new_tokens, temperature=0.0, generator=None):
    """Continuations (token-id lists) of several token-id prompts at once: KV cache, each row stops at end_id
    (kept as the row's last token; a row without it never ended). Prompts of different lengths are left-padded
    (the padding is never attended to, and each row's positions start at its first token), so each row equals
    its prompt's continuation alone. temperature=0 is greedy. Run it inside the caller's autocast."""
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
    """(log-probabilities of y's tokens (B, T), 0 where y is -100 (a prompt, the padding); that mask (B, T)) under
    the distribution at `temperature` (GRPO scores its samples at the temperature they were drawn at)."""
    logits, _ = model(x)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    mask = y != -100
    return logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask, mask


# -------------------------------------------------------------------- Muon

def orthogonalize(G, steps=5, dtype=torch.bfloat16):
    """The (semi-)orthogonal matrix nearest to G (U V^T of its SVD), approximately, by a
    quintic Newton-Schulz iteration (coefficients from Keller Jordan's Muon), in bfloat16 as
    Muon does where that is fast, else float32. G: (m, n), or a stack (k, m, n) done at once."""
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
    """Muon (momentum, then each 2-D update orthogonalized: every direction moves equally) for
    groups with use_muon, plain AdamW for the others, in one optimizer so that train.py's loop,
    schedule, GradScaler and checkpoints treat it like AdamW.
    Under DDP (torch.distributed initialized, every process holding every matrix whole, with the
    same averaged gradients) each process orthogonalizes its share of the matrices and gathers
    the others' updates (modded-nanogpt's way): every process applies the same update, and the
    Newton-Schulz work is divided among them instead of repeated by each. The momentum buffers
    are kept by every process (updating them is cheap), so any one's state_dict is the whole
    state, and a checkpoint resumes on one process or many alike."""

    def __init__(self, groups):
        super().__init__(groups, dict(lr=0.02, momentum=0.95, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0))

    @torch.no_grad()
    def step(self, closure=None):
        gathers = []  # other processes' updates, in flight while this one orthogonalizes the next shape
        for group in self.param_groups:
            params = [p for p in group['params'] if p.grad is not None]
            if not params:
                continue
            if group['use_muon']:
                gathers += self.muon_step(group, params)
            else:
                self.adamw_step(group, params)
        for gather, params, updates, first, alpha in gathers:
            gather.wait()
            self.add_updates(params, updates, first, alpha)

    def muon_step(self, group, params):
        """Momentum (Nesterov), then one batched Newton-Schulz per weight shape: a model's blocks
        share a few shapes, and a few large matmuls beat many small ones. Returns the gathers
        launched (under DDP; on one process each shape's update is applied at once)."""
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
            # the matrices dealt round-robin, shape after shape, so that each process gets an even
            # share of the whole (GPT-2's 4 x 12 on 8 GPUs: 6 each): matrix i goes to (first + i) % world
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
        """(rank, world size) of the processes that share the Newton-Schulz work: under DDP all of
        them; (0, 1) on one process, and under FSDP, whose parameters are DTensor shards rather
        than whole matrices (train.py refuses Muon there)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return 0, 1
        from torch.distributed.tensor import DTensor
        if any(isinstance(p, DTensor) for p in params):
            return 0, 1
        return dist.get_rank(), dist.get_world_size()

    def adamw_step(self, group, params):
        """torch.optim.AdamW's update, by its own functional form: the fused kernel where there is
        one (one pass over all the group's tensors), else PyTorch's default for the device."""
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


def swap_modules(model, wanted, make):
    """Replace, in place, each submodule for which wanted(name, module) holds by make(module), and return model.
    By name, one at a time: a list of the modules themselves would keep every replaced one alive to the end
    (quantizing right after loading then costs little more memory than the loaded model)."""
    for name in [name for name, m in model.named_modules() if name and wanted(name, m)]:
        parent, _, child = name.rpartition('.')
        parent = model.get_submodule(parent)
        setattr(parent, child, make(getattr(parent, child)))
    return model


def apply_lora(model, rank, alpha, targets=('c_attn', 'c_proj', 'c_fc')):
    """Freeze every parameter and wrap the named Linear layers with LoRA adapters (the only
    trainable parameters afterwards, until you unfreeze e.g. a new head). Returns model."""
    model.requires_grad_(False)
    return swap_modules(model, lambda name, m: name.rpartition('.')[2] in targets and type(m) is nn.Linear,
                        lambda linear: LoRALinear(linear, rank, alpha))


@contextmanager
def lora_disabled(model):
    """`with lora_disabled(model):` the model without its LoRA adapters, which is the model fine-tuning
    started from: DPO's and GRPO's reference without a second copy of the weights."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.lora_enabled = True


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
    """Replace every LoRALinear by a plain Linear holding W + (alpha/rank) B A, in place. Returns model."""
    def plain_linear(lora):
        plain = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None,
                          device=lora.weight.device, dtype=lora.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(lora.merged_weight())
            if lora.bias is not None:
                plain.bias.copy_(lora.bias)
        return plain.requires_grad_(lora.weight.requires_grad)
    return swap_modules(model, lambda name, m: isinstance(m, LoRALinear), plain_linear)
