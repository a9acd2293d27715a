"""
Pretrain a GPT (book chapter 5 and appendix D; nanoGPT's train.py).
    python train.py                                 # a small GPT on Python's docs, no download
    python train.py config/train_verdict.py         # the book's chapter-5 run
    python train.py --init_from=resume              # continue the run in out_dir exactly
    python train.py --init_from=gpt2 --eval_only=True --data_dir=data/verdict  # compare models on the same tokens
    python train.py config/train_llama_style.py     # the same run with RoPE, RMSNorm, SwiGLU, GQA
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_fineweb.py
"""
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from configurator import (configure, run_config, setup, die, init_distributed, local_rank0_first, maybe_compile,
                          compile_available, pick_dtype, gpu_peak_flops, save_plot)
from model import GPTConfig
from quantize import cast_and_quantize, talk_dtype
from weights import load_pretrained, save_checkpoint, save_text
from tokenizer import get_tokenizer, token_bytes
from prepare_data import data_tokenizer, find_shards, prepare, read_meta, read_shard
from eval import best, llmc_pairs, read_items, score_choices

# I/O
out_dir = 'out'
data_dir = 'data/pydoc_bpe2048'  # token shards from prepare_data.py (the pydoc ones below are made on first use)
init_from = 'scratch'  # scratch, resume (out_dir/ckpt.pt), or weights to continue: gpt2, qwen3-0.6b, a folder...
eval_interval = 500  # evaluate, print a sample and save the checkpoint every this many steps
eval_iters = 20  # batches per loss estimate
log_interval = 25
sample_prompt = 'The '  # continued at each eval (the book's habit); '' for none
sample_tokens = 64
eval_hellaswag = False  # also measure HellaSwag acc_norm at each eval (the README gives GPT-2 124M's)
eval_only = False  # measure the model (val loss, bits per byte, HellaSwag if asked) on the eval batches, then exit
quantize = 'none'  # eval_only: int8 or int4 = measure it with those weights (quantize.py): what talking in them costs
hellaswag_dir = 'data/hellaswag'  # where its validation set is downloaded to (or already is)
hellaswag_limit = 0  # score only the first N examples (0 = all 10,042)
# data
batch_size = 16  # sequences per micro-batch
block_size = 128  # context length
gradient_accumulation_steps = 1  # micro-batches per step, in total (divided among torchrun processes)
data_order = 'random'  # random: windows anywhere, with replacement (nanoGPT); one_pass: each once an epoch (llm.c)
ddp = 'ddp'  # under torchrun: ddp (each process holds the whole model) or fsdp (weights, grads, optimizer sharded)
# model
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = True  # biases in every Linear and LayerNorm (GPT-2)
# the fields that turn GPT-2 into the Llama family (model.GPTConfig explains each; config/train_llama_style.py)
norm = 'layernorm'  # layernorm | rmsnorm
pos_emb = 'learned'  # learned | rope
rope_theta = 10000.0
mlp = 'gelu'  # gelu | swiglu
mlp_hidden = 0  # 0 = 4 * n_embd
n_kv_head = 0  # 0 = n_head; fewer: grouped-query attention
head_dim = 0  # 0 = n_embd // n_head
qk_norm = False
qkv_bias = False
tie_embeddings = True  # the head shares the token embedding's weights
pad_vocab = 64  # scratch: embedding/head rows up to a multiple of this (50257 -> 50304), faster; 1 = none
# optimizer
optimizer = 'muon'  # muon (Muon for the blocks' matrices, AdamW for the rest), or adamw
muon_lr = 0.02  # Muon's peak learning rate (follows the same schedule)
learning_rate = 4e-3  # AdamW's peak (with Muon: the embeddings', norms' and biases')
max_iters = 1800
weight_decay = 0.2  # AdamW's matrices and embeddings, and Muon's matrices
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 = no clipping
# learning rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters = 100
lr_decay_iters = 0  # 0 = max_iters
min_lr = 4e-4
# system
device = 'auto'  # auto | cpu | cuda | cuda:1 | mps
dtype = 'auto'  # auto | float32 | bfloat16 | float16 (with a GradScaler)
compile = False  # torch.compile the model
grad_checkpoint = False  # recompute each block's activations in backward: less memory for big models
seed = 1337
peak_flops = 0.0  # the GPU's peak FLOP/s for MFU, when configurator.py's table does not know it

# Python's own docs (help() topics, the standard library's docstrings: no download), prepared on first use
# with our own BPE of 2,048 tokens trained on their training split (the default run), of 1,024, or as bytes
AUTO_DATA = {'data/pydoc_bpe2048': dict(tokenizer='bpe', vocab_size=2048),
             'data/pydoc_bpe1024': dict(tokenizer='bpe', vocab_size=1024), 'data/pydoc': dict(tokenizer='bytes')}

NOT_FINITE = ("the {what} is not finite at step {step}; the last good checkpoint in {out_dir} is kept. "
              "Lower --learning_rate, or use --dtype=bfloat16 or float32")
# Generator keys of the training batches: (seed * SEED_STRIDE + step) * KEYS_PER_STEP + the micro-batch's number
# among all processes: a prime above any step or epoch count, so that no two (seed, step) pairs share a key.
SEED_STRIDE = 1_000_003
KEYS_PER_STEP = 4096
EVAL_KEY = 10**9  # the evaluation batches' keys start here: fixed, so every evaluation sees the same batches


class OnePass:
    """The data order one_pass: the split cut into windows of T + 1 tokens (stride T), each read once per epoch in
    an order shuffled by (seed, epoch), as llm.c reads a corpus: no window twice before every one once."""

    def __init__(self, shards, T, seed):
        self.windows_per_shard = torch.tensor([(len(s) - 1) // T for s in shards])
        self.ends = self.windows_per_shard.cumsum(0)
        self.n, self.T, self.seed = int(self.ends[-1]), T, seed
        self.epoch, self.order = None, None

    def starts(self, k):
        """(shard index, start token) of each window of micro-batch number k, both (batch_size,)."""
        picked = []
        for i in range(k * batch_size, (k + 1) * batch_size):
            epoch, j = divmod(i, self.n)
            if epoch != self.epoch:  # one permutation held at a time (4 bytes a window)
                g = torch.Generator().manual_seed(self.seed * SEED_STRIDE + epoch)
                self.epoch, self.order = epoch, torch.randperm(self.n, generator=g, dtype=torch.int32)
            picked.append(int(self.order[j]))
        pos = torch.tensor(picked)
        which = torch.searchsorted(self.ends, pos, right=True)
        return which, (pos - self.ends[which] + self.windows_per_shard[which]) * self.T


def get_batch(shards, key, T, dev, one_pass=None):
    """batch_size windows from the shards: x (B, T) and y = x shifted by one (B, T). Random windows drawn from a
    generator seeded by `key` alone, or with one_pass, micro-batch number `key` of its epochs."""
    if one_pass is not None:
        which, starts = one_pass.starts(key)
    else:
        g = torch.Generator().manual_seed(key)
        starts_per_shard = torch.tensor([len(s) - T for s in shards])
        ends = starts_per_shard.cumsum(0)
        pos = torch.randint(int(ends[-1]), (batch_size,), generator=g)
        which = torch.searchsorted(ends, pos, right=True)
        starts = pos - ends[which] + starts_per_shard[which]
    rows = [shards[w][s:s + T + 1] for w, s in zip(which.tolist(), starts.tolist())]
    xy = torch.from_numpy(np.stack(rows).astype(np.int64))
    x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
    if dev.startswith('cuda'):  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(dev, non_blocking=True), y.pin_memory().to(dev, non_blocking=True)
    return x.to(dev), y.to(dev)


class TrainBatches:
    """The training split's micro-batches in the run's data order (random or one_pass, drawn with order_seed):
    micro-batch `micro` of step `step` is a function of those alone, so resuming needs no loader state."""

    def __init__(self, shards, T, order, order_seed, proc):
        self.shards, self.T, self.order, self.order_seed, self.proc = shards, T, order, order_seed, proc
        self.one_pass = OnePass(shards, T, order_seed) if order == 'one_pass' else None

    def get(self, step, micro):
        p = self.proc
        if self.one_pass is not None:  # the micro-batch's number in the whole run: the epoch's windows in order
            key = (step * p.world_size + p.rank) * p.micro_steps + micro
        else:  # unique per (seed, step, micro-batch across all ranks)
            key = (self.order_seed * SEED_STRIDE + step) * KEYS_PER_STEP + p.rank * p.micro_steps + micro
        return get_batch(self.shards, key, self.T, p.dev, self.one_pass)

    def after(self, step, micro):  # the next micro-batch of the step, or the first of the next step
        return self.get(step, micro + 1) if micro + 1 < self.proc.micro_steps else self.get(step + 1, 0)


def get_lr(it):
    """Linear warmup, then cosine decay from learning_rate to min_lr (appendix D)."""
    decay_iters = lr_decay_iters or max_iters
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def same_tokenizer(a, b):
    """Whether two tokenizer names are the same tokenizer: a tokenizer.json's name is its folder's
    name plus the sha256 of its content, so compare that (the same file in two folders is the same)."""
    def content(name):
        label, _, digest = str(name).rpartition('-')
        return digest if label and len(digest) == 12 else name
    return content(a) == content(b)


def my_share(n, rank, world_size):
    """This process's share of n evaluation items (every world_size-th), padded with None to the same
    count on every rank: under FSDP each forward gathers the weights with all the others."""
    per_rank = -(-n // world_size)
    return [i if i < n else None for i in range(rank, per_rank * world_size, world_size)]


def sum_across_ranks(values, comm_dev='cpu'):
    """Element-wise sum of a list of numbers over all processes. comm_dev: where the process group meets (the GPU
    under nccl, else the CPU; never MPS, which has no float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=comm_dev)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def estimate_loss(model, splits, byte_counts, proc):
    """Mean loss over the same eval_iters batches of each split every time (ch05's calc_loss_loader), shared out
    among the processes; and val_bpb, the val loss summed over tokens per UTF-8 byte they stand for, which compares
    across tokenizers (byte_counts: (vocab,), 0 for special tokens)."""
    model.eval()
    out = {}
    for name, shards in splits.items():
        sums = np.zeros(4)  # loss and tokens; the loss on text tokens (not special ones) and their bytes
        for k in my_share(eval_iters, proc.rank, proc.world_size):
            x, y = get_batch(shards, EVAL_KEY + (k or 0), model.config.block_size, proc.dev)
            with proc.ctx:
                logits, _ = model(x)
            losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction='none')
            nbytes = byte_counts[y.reshape(-1)]
            if k is not None:  # (a padding slot, None, runs only to keep the ranks in step)
                sums += [losses.sum().item(), losses.numel(), losses[nbytes > 0].sum().item(), nbytes.sum().item()]
        loss_sum, tokens, text_loss, text_bytes = sum_across_ranks(sums.tolist(), proc.comm_dev)
        out[name] = loss_sum / tokens
        if name == 'val':
            out['val_bpb'] = text_loss / math.log(2) / max(text_bytes, 1)
    model.train()
    return out


def hellaswag_accuracy(model, examples, tokenizer, dev, ctx, rank=0, world_size=1, comm_dev='cpu', lockstep=False):
    """acc_norm as llm.c and nanoGPT count it (eval.py's acc_norm_llmc, the same code): for each example, the
    ending whose tokens have the lowest mean loss after the context is the model's choice. The examples are shared
    out among the processes; lockstep (FSDP): one forward pass per example on every process."""
    share = my_share(len(examples), rank, world_size)  # a padding slot, None, scores example 0 and does not count
    items = [llmc_pairs(*examples[index or 0]['llmc'], tokenizer) for index in share]
    scores = score_choices(model, items, dev, ctx, share_context=not lockstep)  # an example's endings: one batch
    correct = sum(index is not None and best([s / n for s, n in sc]) == examples[index]['label']
                  for index, sc in zip(share, scores))
    model.train()
    return sum_across_ranks([correct], comm_dev)[0] / max(len(examples), 1)


def save_loss_plot(log_path, png_path):
    """The book's loss plot: train and val loss against tokens seen, at each evaluation."""
    with open(log_path, encoding='utf-8') as f:
        rows = [json.loads(line) for line in f if '"val_loss": null' not in line]
    tokens, train, val = ([r[k] for r in rows] for k in ('tokens_seen', 'train_loss', 'val_loss'))
    save_plot(png_path, 'Tokens seen', [('Loss', tokens, train, val)])


# ---------------------------------------------------------------- the run's setup, in the order main() calls it

@dataclass
class Process:
    """This process's place in the run (rank 0 of 1 without torchrun) and what it computes with."""
    distributed: bool  # under torchrun
    rank: int
    local_rank: int  # its number on this machine
    world_size: int
    dev: str
    device_type: str
    amp_dtype: str
    ctx: object  # autocast, or nothing in float32
    micro_steps: int  # micro-batches per step in this process

    @property
    def master(self):  # the one that prints, logs and saves
        return self.rank == 0

    @property
    def comm_dev(self):  # where small tensors meet for all_reduce
        return self.dev if self.distributed and self.device_type == 'cuda' else 'cpu'


def start_process():
    """Join torchrun's processes (if started by it), check the settings, pick the device and dtype, seed."""
    distributed, rank, local_rank, world_size, dev = init_distributed(device)
    if ddp not in ('ddp', 'fsdp'):
        die(f"--ddp={ddp}: use ddp or fsdp")
    if pad_vocab < 1:
        die(f"--pad_vocab={pad_vocab}: use 1 (no padding) or a multiple such as 64")
    if data_order not in ('random', 'one_pass'):
        die(f"--data_order={data_order}: use random or one_pass")
    if decay_lr and min_lr > learning_rate:  # the cosine would climb from the peak, not decay to min_lr
        die(f"--min_lr={min_lr:g} is above --learning_rate={learning_rate:g}; "
            f"pass --min_lr={learning_rate / 10:g} (a tenth)")
    dev, device_type, amp_dtype, ctx = setup(dev, dtype, seed + rank)  # each rank its own dropout masks
    try:
        talk_dtype(quantize, device_type, amp_dtype)  # an unknown scheme stops here
    except ValueError as e:
        die(e)
    if quantize != 'none' and not eval_only:
        die(f"--quantize={quantize} needs --eval_only=True: {quantize} weights do not train; train or fine-tune first, "
            f"then quantize to talk (sample.py --quantize={quantize})")
    if gradient_accumulation_steps % world_size:
        die(f"--gradient_accumulation_steps={gradient_accumulation_steps} "
            f"must be a multiple of the {world_size} processes")
    return Process(distributed, rank, local_rank, world_size, dev, device_type, amp_dtype, ctx,
                   gradient_accumulation_steps // world_size)


def ensure_data(proc):
    """data_dir's meta.json; the default data sets are prepared on first use, any other must hold shards."""
    if data_dir in AUTO_DATA:  # every rank takes part (the first finds what to do, the others find it done)
        local_rank0_first(lambda: prepare('pydoc', data_dir=data_dir, quiet=proc.local_rank > 0,
                                          **AUTO_DATA[data_dir]), proc.distributed, proc.local_rank)
    if not find_shards(data_dir, 'train'):
        die(f"no training shards (*train*.bin) in {data_dir}; "
            f"make them with python prepare_data.py --data_dir={data_dir} ...")
    return read_meta(data_dir)


class RunStart(NamedTuple):
    """Where training starts: step 0 of a new run, or where the checkpoint left off."""
    step: int
    best_val_loss: float
    order: str  # the training batches' data order (random or one_pass) ...
    order_seed: int  # ... and its seed: a resumed run keeps its own, whatever --data_order and --seed say now


def build_model(meta, proc):
    """The model, initialised alike in every process (FSDP shards it as it is): from scratch, from
    out_dir/ckpt.pt or from published weights. Returns (model, the checkpoint or None, RunStart)."""
    start, vocab = RunStart(0, float('inf'), data_order, seed), meta['vocab_size']
    scratch = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                        vocab_size=vocab, padded_vocab_size=math.ceil(vocab / pad_vocab) * pad_vocab,
                        dropout=dropout, norm=norm, pos_emb=pos_emb, rope_theta=rope_theta, mlp=mlp,
                        mlp_hidden=mlp_hidden, n_kv_head=n_kv_head, head_dim=head_dim, qk_norm=qk_norm,
                        qkv_bias=qkv_bias, tie_embeddings=tie_embeddings) if init_from == 'scratch' else None
    # published weights take this run's context and dropout; a resumed run is the checkpoint's own model
    overrides = {} if init_from == 'resume' else dict(block_size=block_size, dropout=dropout)
    torch.manual_seed(seed)
    try:  # published weights: one process per machine downloads, the others then load from its cache
        load = lambda: load_pretrained(init_from, torch.float32, out_dir, scratch, **overrides)  # noqa: E731
        model, info = local_rank0_first(load, proc.distributed, proc.local_rank)
        ckpt = info['checkpoint'] if init_from == 'resume' else None
        if ckpt is not None:
            start = RunStart(ckpt['iter_num'], ckpt['best_val_loss'], order_seed=ckpt['data']['seed'],
                             order=ckpt['data'].get('order', 'random'))
            if (start.order_seed, start.order) != (seed, data_order) and proc.master:
                print(f"notice: resuming the run of --seed={start.order_seed} --data_order={start.order}; its data "
                      f"order and generators continue (--seed={seed} --data_order={data_order} ignored)")
            saved = ckpt.get('tokenizer')  # 'bytes', 'gpt2' or a spec {'name', 'json'}
            saved = saved['name'] if isinstance(saved, dict) else saved
            if not same_tokenizer(saved, meta['tokenizer']):
                die(f"{out_dir}/ckpt.pt was trained on {saved} tokens but {data_dir} holds {meta['tokenizer']} tokens")
        elif init_from != 'scratch' and not same_tokenizer(get_tokenizer(info['tokenizer']).name, meta['tokenizer']):
            die(f"{init_from} continues on its own tokens, but {data_dir} holds {meta['tokenizer']} tokens; "
                f"prepare it with --tokenizer={info['tokenizer']}")
    except (OSError, ValueError) as e:
        die(e)
    torch.manual_seed(seed + proc.rank)  # dropout then differs per rank
    if vocab > model.config.vocab_size:
        die(f"{data_dir} holds {meta['tokenizer']} tokens ({vocab} ids) but the model knows {model.config.vocab_size}")
    return model, ckpt, start


def load_data(T, proc):
    """The train and val splits (windows of T + 1 tokens), their tokenizer, the bytes each token id
    stands for (for bits per byte) and, if asked, the HellaSwag examples."""
    try:  # each split's memory-mapped shards that hold at least one window of T + 1 tokens
        splits = {name: [s for s in map(read_shard, find_shards(data_dir, name)) if len(s) > T]
                  for name in ('train', 'val')}
        tokenizer = data_tokenizer(data_dir)  # travels in the checkpoint, so sample.py decodes on any machine
    except (OSError, ValueError) as e:
        die(e)
    for name, shards in splits.items():
        if not shards:
            die(f"the {name} split in {data_dir} has no shard longer than block_size={T} tokens; "
                "use a smaller --block_size or more text (or a larger --val_fraction in prepare_data.py)")
    byte_counts = torch.from_numpy(token_bytes(tokenizer)).to(proc.dev)
    hellaswag = None
    if eval_hellaswag:  # every process scores its share of the examples
        hellaswag = local_rank0_first(lambda: read_items('hellaswag', hellaswag_dir),
                                      proc.distributed, proc.local_rank)[:hellaswag_limit or None]
    return splits, tokenizer, byte_counts, hellaswag


def hellaswag_text(losses, hellaswag):
    return f", HellaSwag acc_norm {100 * losses['hellaswag']:.2f}% of {len(hellaswag)}" if hellaswag else ""


def evaluate_only(model, splits, tokenizer, byte_counts, hellaswag, proc):
    """--eval_only: the val batches every evaluation scores, so that models compare on equal tokens; nothing written."""
    losses = estimate_loss(model, {'val': splits['val']}, byte_counts, proc)
    if hellaswag:
        losses['hellaswag'] = hellaswag_accuracy(model, hellaswag, tokenizer, proc.dev, proc.ctx, proc.rank,
                                                 proc.world_size, proc.comm_dev)
    if proc.master:
        print(f"{init_from}{f' ({quantize} weights)' if quantize != 'none' else ''}: val loss {losses['val']:.4f}, "
              f"{losses['val_bpb']:.4f} bits per byte on {eval_iters} x "
              f"{batch_size} x {model.config.block_size} tokens of {data_dir}" + hellaswag_text(losses, hellaswag))
    if proc.distributed:
        leave_process_group(0)


def leave_process_group(exit_code):
    """The end of a torchrun process: wait for every rank, tear the group down, and exit at once: after that, gloo
    can abort the interpreter's own teardown ('terminate called without an active exception'), failing a run that
    finished; everything is written and closed by now."""
    torch.distributed.barrier()  # no process tears gloo/nccl down while another still talks to it
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


class Parallel:
    """How the model trains across torchrun's processes, the one place that tells DDP from FSDP. Alone or under DDP
    each process holds the whole model. Under FSDP (--ddp=fsdp) each block's weights, gradients and optimizer state
    are split across the processes and gathered only while in use: every rank joins each forward, sample and save."""

    def __init__(self, model, proc):
        self.raw, self.model, self.proc, self.fsdp = model, model, proc, proc.distributed and ddp == 'fsdp'
        self.samples_here = proc.master or self.fsdp  # who generates the eval sample
        if not self.fsdp:
            self.model = maybe_compile(model, compile, proc.device_type)
            if proc.distributed:
                from torch.nn.parallel import DistributedDataParallel as DDP
                self.model = DDP(self.model, device_ids=[proc.local_rank] if proc.device_type == 'cuda' else None)
            return
        if optimizer == 'muon':
            die("--optimizer=muon orthogonalizes whole matrices; "
                "use it with --ddp=ddp, or --optimizer=adamw with --ddp=fsdp")
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # bf16 weights gathered and used (half the traffic), gradients reduced and kept in float32
        bf16 = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if proc.amp_dtype == 'bfloat16' else {}
        mixed_precision = MixedPrecisionPolicy(**bf16)
        for block in model.transformer.h:
            if compile and compile_available(proc.device_type):  # each block on its own, before sharding: compiling
                block.compile()  # the root would break the graph at every block
            fully_shard(block, mp_policy=mixed_precision)
        fully_shard(model, mp_policy=mixed_precision)

    def set_gradient_sync(self, on):  # whether this backward averages the gradients across the processes
        if self.fsdp:
            self.model.set_requires_gradient_sync(on)
        elif self.proc.distributed:
            self.model.require_backward_grad_sync = on

    def grad_norm(self, total_norm):  # under FSDP a sharded tensor: gathering it needs every rank
        return float(total_norm.full_tensor() if self.fsdp else total_norm)

    @contextmanager
    def for_generation(self):
        """The module ready for generate(): under FSDP with its weights gathered (generate() calls the trunk, past
        the root's gathering hook), and eager: compiled blocks would compile again for one token at a time."""
        if self.fsdp:
            self.raw.unshard()
        with torch.compiler.set_stance('force_eager'):
            yield self.raw
        if self.fsdp:
            self.raw.reshard()

    def can_checkpoint(self, optim):  # FSDP: not before the first step (gathering a stateless optimizer steps it)
        return not self.fsdp or bool(optim.state)

    def state_dicts(self, optim):
        """The model's and the optimizer's state; under FSDP gathered onto rank 0's CPU (every rank calls it)."""
        if not self.fsdp:
            return self.raw.state_dict(), optim.state_dict()
        from torch.distributed.checkpoint.state_dict import get_state_dict, StateDictOptions
        return get_state_dict(self.raw, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, optim, ckpt):
        if ckpt.get('fsdp', False) != self.fsdp:  # the two keep optimizer state in different layouts
            die(f"{out_dir}/ckpt.pt was saved {'with' if ckpt.get('fsdp') else 'without'} --ddp=fsdp under torchrun; "
                "resume it the same way")
        if not self.fsdp:
            return optim.load_state_dict(ckpt['optimizer'])
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict, StateDictOptions
        set_optimizer_state_dict(self.raw, optim, ckpt['optimizer'], options=StateDictOptions(full_state_dict=True))


def make_optimizer(model, proc):
    try:
        # Muon's Newton-Schulz in bfloat16 wherever the hardware computes it natively (even in a float32 run)
        native_bf16 = proc.amp_dtype == 'bfloat16' or pick_dtype('auto', proc.device_type) == 'bfloat16'
        return model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), proc.device_type, optimizer,
                                          muon_lr, torch.bfloat16 if native_bf16 else torch.float32)
    except ValueError as e:
        die(e)


def restore_training_state(ckpt, parallel, optim, scaler, proc):
    """The exact state the checkpointed run was in: optimizer, GradScaler and every rank's generators."""
    saved = ckpt.get('config', {}).get('optimizer', 'adamw')  # (checkpoints without the key are AdamW's)
    if saved != optimizer:
        die(f"{out_dir}/ckpt.pt was trained with --optimizer={saved}; resume it with --optimizer={saved}")
    parallel.load_optimizer_state(optim, ckpt)
    if ckpt['scaler']:  # empty when the run was not float16: a fresh scaler then
        scaler.load_state_dict(ckpt['scaler'])
    rng = ckpt['rng']  # each rank's own generators (a rank beyond those saved keeps its seed + rank)
    if proc.rank < len(rng['torch']):
        torch.set_rng_state(rng['torch'][proc.rank])
    if proc.device_type == 'cuda' and proc.rank < len(rng['cuda']) and rng['cuda'][proc.rank] is not None:
        torch.cuda.set_rng_state(rng['cuda'][proc.rank], proc.dev)


def open_log(step):
    """out_dir/log.jsonl, for appending: a resumed run keeps the rows up to its checkpoint's step, a new one none."""
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, 'log.jsonl')
    kept = []
    if init_from == 'resume' and os.path.exists(log_path):
        with open(log_path, encoding='utf-8') as f:
            kept = [line for line in f if json.loads(line)['step'] <= step]
    save_text(log_path, ''.join(kept))
    return open(log_path, 'a', encoding='utf-8')


def log_json(log_file, **row):
    print(json.dumps(row), file=log_file, flush=True)


# ---------------------------------------------------------------- what the loop calls

def any_process(flag, proc):
    """True if this or (under torchrun) any process says so: every rank then acts at the same step."""
    return sum_across_ranks([float(flag)], proc.comm_dev)[0] > 0


class StepTimer:
    """Seconds per training step for the log line: the wall time since the last log line over the steps it
    covered, evaluations not counted, nor the run's first step (it compiles and warms up) unless it is alone."""

    def __init__(self, step):
        self.t0, self.step0, self.first_step = time.time(), step, step + 1

    @contextmanager
    def paused(self):
        paused_at = time.time()
        yield
        self.t0 += time.time() - paused_at

    def step_done(self, step):
        if step == self.first_step and step % log_interval:
            self.t0, self.step0 = time.time(), step

    def lap(self, step):  # at a log step, after .item() waited for the GPU
        dt = (time.time() - self.t0) / (step - self.step0)
        self.t0, self.step0 = time.time(), step
        return dt


def evaluate(parallel, splits, tokenizer, byte_counts, hellaswag, proc):
    """(losses, sample): train and val loss (and HellaSwag, if asked), and the model's greedy continuation of
    sample_prompt, as the book prints at each evaluation. The generators are left as they were, so that a run
    with evaluations draws the same dropout as one without."""
    sample = ''
    with torch.random.fork_rng(devices=[proc.dev] if proc.device_type == 'cuda' else []):
        losses = estimate_loss(parallel.raw, splits, byte_counts, proc)
        if hellaswag:  # the scorer calls the trunk and the head, past FSDP's gathering hook: gathered first
            with parallel.for_generation() as model:
                losses['hellaswag'] = hellaswag_accuracy(model, hellaswag, tokenizer, proc.dev, proc.ctx, proc.rank,
                                                         proc.world_size, proc.comm_dev, lockstep=parallel.fsdp)
        if parallel.samples_here and sample_prompt:
            prompt = torch.tensor([tokenizer.encode(sample_prompt)[-parallel.raw.config.block_size:]], device=proc.dev)
            with proc.ctx, parallel.for_generation() as model:
                out = model.eval().generate(prompt, sample_tokens, temperature=0)
            model.train()
            sample = tokenizer.decode(out[0, prompt.size(1):].tolist())
    return losses, sample


def save_training_state(parallel, optim, scaler, proc, about_run, iter_num, best_val_loss, batches):
    """out_dir/ckpt.pt; about_run: what stays the same all run (tokenizer, config). Every rank calls it (the
    gathers are collective), rank 0 writes it."""
    # every rank's own generators (CPU, and its GPU's for dropout there), so that a resumed run continues exactly
    own_rng = (torch.get_rng_state(), torch.cuda.get_rng_state(proc.dev) if proc.device_type == 'cuda' else None)
    rngs = [own_rng]
    if proc.distributed:
        rngs = [None] * proc.world_size
        torch.distributed.all_gather_object(rngs, own_rng)
    model_sd, optim_sd = parallel.state_dicts(optim)
    if proc.master:
        save_checkpoint(os.path.join(out_dir, 'ckpt.pt'), parallel.raw, **about_run, weights=model_sd,
                        iter_num=iter_num, best_val_loss=best_val_loss, optimizer=optim_sd, fsdp=parallel.fsdp,
                        scaler=scaler.state_dict(), rng={'torch': [r[0] for r in rngs], 'cuda': [r[1] for r in rngs]},
                        data={'seed': batches.order_seed, 'step': iter_num, 'order': batches.order})


def finish(proc, interrupted, iter_num, log_file):
    if proc.master:
        log_file.close()
        if interrupted:
            print(f"interrupted: saved step {iter_num} to {out_dir}/ckpt.pt; continue with --init_from=resume")
        else:
            save_loss_plot(os.path.join(out_dir, 'log.jsonl'), os.path.join(out_dir, 'loss.png'))
            print(f"done: {out_dir}/ckpt.pt (step {iter_num}); try python sample.py --out_dir={out_dir}")
    if proc.distributed:
        leave_process_group(130 if interrupted else 0)
    if interrupted:
        sys.exit(130)


def main():
    config = run_config(globals())  # what this run was asked to do, for the checkpoint
    proc = start_process()
    meta = ensure_data(proc)
    model, ckpt, start = build_model(meta, proc)
    T = model.config.block_size
    splits, tokenizer, byte_counts, hellaswag = load_data(T, proc)
    about_run = {'tokenizer': tokenizer.spec, 'config': config}  # in every checkpoint
    if quantize != 'none':  # as sample.py --quantize talks, on the CPU before the move
        cast_and_quantize(model, quantize, proc.device_type, proc.amp_dtype)
    model.to(proc.dev)
    if eval_only:
        return evaluate_only(model, splits, tokenizer, byte_counts, hellaswag, proc)
    parallel = Parallel(model, proc)  # parallel.model trains; model stays the module itself (evaluation, checkpoints)
    optim = make_optimizer(model, proc)
    model.grad_checkpoint = grad_checkpoint
    scaler = torch.amp.GradScaler(proc.device_type, enabled=proc.amp_dtype == 'float16')
    if ckpt is not None:
        restore_training_state(ckpt, parallel, optim, scaler, proc)
        ckpt = None  # free the memory
    peak = peak_flops or gpu_peak_flops(proc.dev, proc.amp_dtype)
    tokens_per_step = gradient_accumulation_steps * batch_size * T
    if proc.master:
        print(f"{model.get_num_params():,} parameters | {tokens_per_step:,} tokens per step "
              f"({proc.world_size} x {proc.micro_steps} x {batch_size} x {T}) | {proc.dev} {proc.amp_dtype} | "
              f"data {data_dir} ({meta['tokenizer']})")
    log_file = open_log(start.step) if proc.master else None
    ctrl_c = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: ctrl_c.set())  # finish the step, save, exit
    batches = TrainBatches(splits['train'], T, start.order, start.order_seed, proc)
    iter_num, best_val_loss = start.step, start.best_val_loss
    X, Y = batches.get(iter_num, 0)
    timer = StepTimer(iter_num)
    while True:
        lr = get_lr(iter_num)
        for group in optim.param_groups:
            group['lr'] = lr * group.get('lr_scale', 1.0)
        asks_others = not proc.distributed or iter_num % log_interval == 0  # asking is a collective: at log steps
        interrupted = asks_others and any_process(ctrl_c.is_set(), proc)  # every process stops at the same step
        at_end = iter_num >= max_iters or interrupted
        already_evaluated = init_from == 'resume' and iter_num == start.step  # by the run that saved the checkpoint
        if (iter_num % eval_interval == 0 and not already_evaluated) or at_end:
            with timer.paused():
                losses, sample = evaluate(parallel, splits, tokenizer, byte_counts, hellaswag, proc)
                if not all(math.isfinite(v) for v in losses.values()):  # the same sums on every rank: all stop
                    die(NOT_FINITE.format(what="evaluation loss", step=iter_num, out_dir=out_dir))
                if proc.master:
                    print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
                          f"(perplexity {math.exp(min(losses['val'], 50)):.1f}, {losses['val_bpb']:.4f} bits per byte)"
                          + hellaswag_text(losses, hellaswag))
                    if sample:
                        print(f"  sample: {sample_prompt + sample!r}")
                    log_json(log_file, step=iter_num, train_loss=losses['train'], val_loss=losses['val'],
                             val_bpb=losses['val_bpb'], lr=lr, tokens_seen=iter_num * tokens_per_step, ms_per_step=None,
                             tokens_per_s=None, mfu=None, **({'hellaswag': losses['hellaswag']} if hellaswag else {}))
                    best_val_loss = min(best_val_loss, losses['val'])
                if parallel.can_checkpoint(optim):
                    save_training_state(parallel, optim, scaler, proc, about_run, iter_num, best_val_loss, batches)
            if at_end:
                break
        # one optimizer step: micro_steps micro-batches, gradients averaged (and synced across ranks once)
        for micro in range(proc.micro_steps):
            parallel.set_gradient_sync(on=micro == proc.micro_steps - 1)
            with proc.ctx:
                _, loss = parallel.model(X, Y)
                loss = loss / proc.micro_steps  # the sum over micro-batches is then the mean
            X, Y = batches.after(iter_num, micro)  # the next micro-batch, fetched while the GPU works
            scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optim)
            total_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optim)
        scaler.update()
        optim.zero_grad(set_to_none=True)
        iter_num += 1
        timer.step_done(iter_num)
        if iter_num % log_interval == 0:
            lossf = loss.item() * proc.micro_steps  # .item() waits for the GPU: only here, at log steps
            if any_process(not math.isfinite(lossf), proc):
                die(NOT_FINITE.format(what=f"training loss ({lossf})", step=iter_num, out_dir=out_dir))
            grad_norm = parallel.grad_norm(total_norm) if grad_clip else None
            if proc.master:
                dt = timer.lap(iter_num)
                tok_s = tokens_per_step / dt
                mfu = model.estimate_mfu(tok_s / proc.world_size, peak)
                grad_norm_text = f" | grad norm {grad_norm:.2f}" if grad_clip else ""
                print(f"step {iter_num} | loss {lossf:.4f} | lr {lr:.2e}{grad_norm_text} | {dt * 1000:.0f} ms/step | "
                      f"{tok_s:,.0f} tok/s" + (f" | MFU {100 * mfu:.1f}%" if mfu else ""))
                log_json(log_file, step=iter_num, train_loss=lossf, val_loss=None, val_bpb=None, lr=lr,
                         tokens_seen=iter_num * tokens_per_step, ms_per_step=dt * 1000, tokens_per_s=tok_s, mfu=mfu)
    finish(proc, interrupted, iter_num, log_file)


if __name__ == '__main__':
    configure(globals())
    main()
