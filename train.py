"""
Pretrain a GPT (book chapter 5 and appendix D; nanoGPT's train.py).
    python train.py                                     # a small GPT on Python's docs, ~5 min on 2 CPU cores
    python train.py config/train_verdict.py             # the book's chapter-5 run
    python train.py --init_from=resume                  # continue the run in out_dir exactly
    python train.py --init_from=gpt2 --eval_only=True --data_dir=data/verdict   # compare models on the same tokens
    python train.py config/train_llama_style.py         # the same run with RoPE, RMSNorm, SwiGLU, GQA
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_fineweb.py
"""
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from configurator import (configure, config_keys, setup, die, init_distributed, local_rank0_first, maybe_compile,
                          compile_available, pick_dtype, gpu_peak_flops)
from model import GPT, GPTConfig
from weights import load_checkpoint, load_pretrained, model_from_checkpoint, save_checkpoint
from tokenizer import get_tokenizer, token_bytes
from prepare_data import data_tokenizer, find_shards, hellaswag_examples, prepare, read_meta, read_shard

# I/O
out_dir = 'out'
data_dir = 'data/pydoc_bpe2048'  # token shards from prepare_data.py (the pydoc ones below are made on first use)
init_from = 'scratch'  # scratch, resume (out_dir/ckpt.pt), or published weights to continue: gpt2, qwen3-0.6b, a folder...
eval_interval = 500  # evaluate, print a sample and save the checkpoint every this many steps
eval_iters = 20  # batches per loss estimate
log_interval = 25
sample_prompt = 'The '  # continued at each eval (the book's habit); '' for none
sample_tokens = 64
eval_hellaswag = False  # also measure HellaSwag acc_norm at each eval (GPT-2 124M: ~29.5%)
eval_only = False  # measure the model (val loss and bits per byte, HellaSwag if asked) on the fixed eval batches and exit
hellaswag_dir = 'data/hellaswag'  # where its validation set is downloaded to (or already is)
hellaswag_limit = 0  # score only the first N examples (0 = all 10,042)
# data
batch_size = 16  # sequences per micro-batch
block_size = 128  # context length
gradient_accumulation_steps = 1  # micro-batches per step, in total (divided among torchrun processes)
data_order = 'random'  # random: windows drawn anywhere, with replacement (nanoGPT); one_pass: each window once per epoch, shuffled (llm.c)
ddp = 'ddp'  # under torchrun: ddp (each process holds the whole model) or fsdp (weights, gradients, optimizer state sharded)
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
# (the extra logits are cut off in model.py: never sampled or scored)
# optimizer
optimizer = 'muon'  # muon (Muon for the blocks' matrices, AdamW for the rest; README "The default run"), or adamw
muon_lr = 0.02  # Muon's peak learning rate (follows the same schedule)
learning_rate = 4e-3  # AdamW's peak (with Muon: the embeddings', norms' and biases')
max_iters = 1800
weight_decay = 0.2  # AdamW's matrices and embeddings, and Muon's matrices (README "The default run")
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
peak_flops = 0.0  # the GPU's peak FLOP/s for MFU, when model.py's table does not know it

# Python's own docs (the help() topics and the standard library's docstrings: no download), prepared on
# first use: with our own BPE of 2,048 tokens trained on their training split (the default run: README
# "The default run"), of 1,024, or as bytes (the whole-book block)
AUTO_DATA = {'data/pydoc_bpe2048': dict(tokenizer='bpe', vocab_size=2048),
             'data/pydoc_bpe1024': dict(tokenizer='bpe', vocab_size=1024), 'data/pydoc': dict(tokenizer='bytes')}

NOT_FINITE = ("the {what} is not finite at step {step}; the last good checkpoint in {out_dir} is kept. "
              "Lower --learning_rate, or use --dtype=bfloat16 or float32")


def load_split(split, T):
    """The memory-mapped shards of a split that hold at least one window of T + 1 tokens."""
    shards = [read_shard(p) for p in find_shards(data_dir, split)]
    return [s for s in shards if len(s) > T]


class OnePass:
    """The data order one_pass: the split cut into windows of T + 1 tokens (stride T), each read
    once per epoch in an order shuffled by (seed, epoch), as llm.c and most large runs read a
    corpus: no window seen twice before every one has been seen once. Batch k is a function of k
    alone, so resuming needs no loader state beyond the step number."""

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
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self.epoch, self.order = epoch, torch.randperm(self.n, generator=g, dtype=torch.int32)
            picked.append(int(self.order[j]))
        pos = torch.tensor(picked)
        which = torch.searchsorted(self.ends, pos, right=True)
        return which, (pos - self.ends[which] + self.windows_per_shard[which]) * self.T


def get_batch(shards, key, T, dev, one_pass=None):
    """batch_size windows from the shards: x (B, T) and y = x shifted by one (B, T). Random windows
    drawn from a generator seeded by `key` alone, or with one_pass, micro-batch number `key` of its
    epochs; either way a step's batch never depends on what ran before it: resuming needs no
    data-loader state beyond the step number."""
    if one_pass is not None:
        which, starts = one_pass.starts(key)
    else:
        g = torch.Generator().manual_seed(key)
        starts_per_shard = torch.tensor([len(s) - T for s in shards])
        ends = starts_per_shard.cumsum(0)
        pos = torch.randint(int(ends[-1]), (batch_size,), generator=g)
        which = torch.searchsorted(ends, pos, right=True)
        starts = pos - ends[which] + starts_per_shard[which]
    xy = torch.from_numpy(np.stack([shards[w][s:s + T + 1] for w, s in zip(which.tolist(), starts.tolist())]).astype(np.int64))
    x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
    if dev.startswith('cuda'):  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(dev, non_blocking=True), y.pin_memory().to(dev, non_blocking=True)
    return x.to(dev), y.to(dev)


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


def tokenizer_name(spec):
    """The name in a tokenizer's spec as checkpoints carry it: 'bytes', 'gpt2' or {'name', 'json'}."""
    return spec['name'] if isinstance(spec, dict) else spec


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
    """Element-wise sum of a list of numbers over all processes (each one measured its share).
    comm_dev: where the process group meets (the GPU under nccl, else the CPU; never MPS, which
    has no float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=comm_dev)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def estimate_loss(model, splits, T, dev, ctx, byte_counts, rank=0, world_size=1, comm_dev='cpu'):
    """Mean loss over the same eval_iters batches of each split every time (ch05's calc_loss_loader),
    the batches shared out among the processes; and val_bpb, the validation loss in bits per UTF-8
    byte of text (summed over tokens, divided by the bytes they stand for), which compares across
    tokenizers. byte_counts: (vocab,) bytes per token id, 0 for special tokens (not counted)."""
    model.eval()
    out = {}
    for name, shards in splits.items():
        loss_sum, tokens, text_loss, text_bytes = 0.0, 0, 0.0, 0
        for k in my_share(eval_iters, rank, world_size):
            x, y = get_batch(shards, 10**9 + (k or 0), T, dev)
            with ctx:
                logits, _ = model(x)
            losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction='none')
            nbytes = byte_counts[y.reshape(-1)]
            if k is not None:
                loss_sum, tokens = loss_sum + losses.sum().item(), tokens + losses.numel()
                text_loss, text_bytes = text_loss + losses[nbytes > 0].sum().item(), text_bytes + nbytes.sum().item()
        loss_sum, tokens, text_loss, text_bytes = sum_across_ranks([loss_sum, tokens, text_loss, text_bytes], comm_dev)
        out[name] = loss_sum / tokens
        if name == 'val':
            out['val_bpb'] = text_loss / math.log(2) / max(text_bytes, 1)
    model.train()
    return out


@torch.no_grad()
def hellaswag_accuracy(model, examples, tokenizer, dev, ctx, rank=0, world_size=1, comm_dev='cpu'):
    """acc_norm as llm.c and nanoGPT count it: for each example, the ending whose tokens have the
    lowest mean loss after the context is the model's choice. The examples are shared out among
    the processes and the counts summed."""
    model.eval()
    correct = 0
    for index in my_share(len(examples), rank, world_size):
        ex = examples[index or 0]  # (a padding slot, None, scores example 0 and does not count)
        ctx_ids = tokenizer.encode(ex['ctx'])
        endings = [tokenizer.encode(' ' + e) for e in ex['endings']]
        rows = [(ctx_ids + e)[-model.config.block_size - 1:] for e in endings]  # 4 candidates, one per row
        T = max(map(len, rows))
        x = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T - 1)  # 1 where the next token belongs to the ending
        for i, (r, e) in enumerate(zip(rows, endings)):
            x[i, :len(r)] = torch.tensor(r)
            mask[i, max(len(r) - len(e) - 1, 0):len(r) - 1] = 1
        x, mask = x.to(dev), mask.to(dev)
        with ctx:
            logits, _ = model(x[:, :-1])
        losses = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction='none')  # (4, T-1)
        correct += int((losses * mask).sum(1).div(mask.sum(1)).argmin().item() == ex['label'] and index is not None)
    model.train()
    return sum_across_ranks([correct], comm_dev)[0] / max(len(examples), 1)


def save_loss_plot(log_path, png_path):
    """The book's loss plot (train and val loss against tokens seen), if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("(pip install matplotlib for out_dir/loss.png)")
        return
    rows = [json.loads(line) for line in open(log_path, encoding='utf-8') if '"val_loss": null' not in line]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r['tokens_seen'] for r in rows], [r['train_loss'] for r in rows], label='Training loss')
    ax.plot([r['tokens_seen'] for r in rows], [r['val_loss'] for r in rows], linestyle='-.', label='Validation loss')
    ax.set_xlabel('Tokens seen')
    ax.set_ylabel('Loss')
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def main():
    config = {k: globals()[k] for k in config_keys(globals())}  # what this run was asked to do, for the checkpoint
    distributed, rank, local_rank, world_size, dev = init_distributed(device)
    if ddp not in ('ddp', 'fsdp'):
        die(f"--ddp={ddp}: use ddp or fsdp")
    if pad_vocab < 1:
        die(f"--pad_vocab={pad_vocab}: use 1 (no padding) or a multiple such as 64")
    if data_order not in ('random', 'one_pass'):
        die(f"--data_order={data_order}: use random or one_pass")
    if decay_lr and min_lr > learning_rate:  # the cosine would climb from the peak, not decay to min_lr
        die(f"--min_lr={min_lr:g} is above --learning_rate={learning_rate:g}; pass --min_lr={learning_rate / 10:g} (a tenth)")
    fsdp = distributed and ddp == 'fsdp'
    master = rank == 0
    sampling = master or fsdp  # under FSDP every process takes part in each forward, the sample's too
    dev, device_type, amp_dtype, ctx = setup(dev, dtype, seed + rank)  # each rank its own dropout masks
    comm_dev = dev if distributed and device_type == 'cuda' else 'cpu'  # where small tensors meet for all_reduce
    if gradient_accumulation_steps % world_size:
        die(f"--gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the {world_size} processes")
    micro_steps = gradient_accumulation_steps // world_size  # micro-batches per process

    # data: prepare the default data set on first use, otherwise insist on shards
    if data_dir in AUTO_DATA:  # every rank takes part (the first finds what to do, the others find it done)
        local_rank0_first(lambda: prepare('pydoc', data_dir=data_dir, quiet=local_rank > 0, **AUTO_DATA[data_dir]),
                          distributed, local_rank)
    if not find_shards(data_dir, 'train'):
        die(f"no training shards (*train*.bin) in {data_dir}; make them with python prepare_data.py --data_dir={data_dir} ...")
    meta = read_meta(data_dir)

    # model: initialised alike in every process (FSDP shards it as it is), dropout then differs per rank
    iter_num, best_val_loss, ckpt, data_seed, run_order = 0, float('inf'), None, seed, data_order
    torch.manual_seed(seed)
    try:
        if init_from == 'scratch':
            padded = math.ceil(meta['vocab_size'] / pad_vocab) * pad_vocab
            model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                                  vocab_size=meta['vocab_size'], padded_vocab_size=padded, dropout=dropout,
                                  norm=norm, pos_emb=pos_emb, rope_theta=rope_theta, mlp=mlp, mlp_hidden=mlp_hidden,
                                  n_kv_head=n_kv_head, head_dim=head_dim, qk_norm=qk_norm, qkv_bias=qkv_bias,
                                  tie_embeddings=tie_embeddings))
        elif init_from == 'resume':
            ckpt = load_checkpoint(out_dir, map_location='cpu')
            model = model_from_checkpoint(ckpt, f"{out_dir}/ckpt.pt")
            iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
            data_seed = ckpt['data']['seed']  # the run's data order, whatever --seed says now
            run_order = ckpt['data'].get('order', 'random')
            if (data_seed, run_order) != (seed, data_order) and master:
                print(f"notice: resuming the run of --seed={data_seed} --data_order={run_order}; its data order and "
                      f"generators continue (--seed={seed} --data_order={data_order} ignored)")
            if not same_tokenizer(tokenizer_name(ckpt.get('tokenizer')), meta['tokenizer']):
                die(f"{out_dir}/ckpt.pt was trained on {tokenizer_name(ckpt.get('tokenizer'))} tokens but {data_dir} "
                    f"holds {meta['tokenizer']} tokens")
        else:  # published weights: one process per machine downloads, the others then load from its cache
            model, info = local_rank0_first(lambda: load_pretrained(init_from, dtype=torch.float32, block_size=block_size,
                                                                    dropout=dropout), distributed, local_rank)
            if not same_tokenizer(get_tokenizer(info['tokenizer']).name, meta['tokenizer']):
                die(f"{init_from} continues on its own tokens, but {data_dir} holds {meta['tokenizer']} tokens; "
                    f"prepare it with --tokenizer={info['tokenizer']}")
    except (OSError, ValueError) as e:
        die(e)
    torch.manual_seed(seed + rank)
    if meta['vocab_size'] > model.config.vocab_size:
        die(f"{data_dir} holds {meta['tokenizer']} tokens ({meta['vocab_size']} ids) but the model knows {model.config.vocab_size}")
    model_args = asdict(model.config)
    T = model.config.block_size
    try:
        splits = {'train': load_split('train', T), 'val': load_split('val', T)}
    except ValueError as e:
        die(e)
    for name, shards in splits.items():
        if not shards:
            die(f"the {name} split in {data_dir} has no shard longer than block_size={T} tokens; "
                "use a smaller --block_size or more text (or a larger --val_fraction in prepare_data.py)")
    try:
        tokenizer = data_tokenizer(data_dir)  # travels in the checkpoint, so sample.py decodes on any machine
    except (OSError, ValueError) as e:
        die(e)
    byte_counts = torch.from_numpy(token_bytes(tokenizer)).to(dev)
    hellaswag = None
    if eval_hellaswag:  # every process scores its share of the examples
        hellaswag = local_rank0_first(lambda: hellaswag_examples(hellaswag_dir), distributed, local_rank)
        hellaswag = hellaswag[:hellaswag_limit or None]
    model.to(dev)
    if eval_only:  # the same eval_iters batches of the validation split as every eval: models compare on equal tokens
        losses = estimate_loss(model, {'val': splits['val']}, T, dev, ctx, byte_counts, rank, world_size, comm_dev)
        if hellaswag:
            losses['hellaswag'] = hellaswag_accuracy(model, hellaswag, tokenizer, dev, ctx, rank, world_size, comm_dev)
        if master:
            print(f"{init_from}: val loss {losses['val']:.4f}, {losses['val_bpb']:.4f} bits per byte on "
                  f"{eval_iters} x {batch_size} x {T} tokens of {data_dir}"
                  + (f", HellaSwag acc_norm {100 * losses['hellaswag']:.2f}% of {len(hellaswag)}" if hellaswag else ""))
        if distributed:
            torch.distributed.destroy_process_group()
        return
    if fsdp:  # each block's weights (then the rest) split across processes, gathered only while in use
        if optimizer == 'muon':
            die("--optimizer=muon orthogonalizes whole matrices; use it with --ddp=ddp, or --optimizer=adamw with --ddp=fsdp")
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # bf16 weights gathered and used (half the traffic), gradients reduced and kept in float32
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if amp_dtype == 'bfloat16' \
            else MixedPrecisionPolicy()
        compile_blocks = compile and compile_available(device_type)
        for block in model.transformer.h:
            if compile_blocks:  # each block on its own: compiling the root would break the graph at every block
                block.compile()
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    try:
        # Muon's Newton-Schulz in bfloat16 wherever the hardware computes it natively (even in a float32 run)
        native_bf16 = amp_dtype == 'bfloat16' or pick_dtype('auto', device_type) == 'bfloat16'
        optim = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, optimizer, muon_lr,
                                           torch.bfloat16 if native_bf16 else torch.float32)
    except ValueError as e:
        die(e)
    model.grad_checkpoint = grad_checkpoint
    scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == 'float16')
    if ckpt is not None:  # the exact state the run was in
        if ckpt.get('fsdp', False) != fsdp:  # the two keep optimizer state in different layouts
            die(f"{out_dir}/ckpt.pt was saved {'with' if ckpt.get('fsdp') else 'without'} --ddp=fsdp under torchrun; "
                "resume it the same way")
        saved_optimizer = ckpt.get('config', {}).get('optimizer', 'adamw')
        if saved_optimizer != optimizer:  # (the default changed to muon on 2026-11-29)
            die(f"{out_dir}/ckpt.pt was trained with --optimizer={saved_optimizer}; "
                f"resume it with --optimizer={saved_optimizer}")
        if fsdp:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict, StateDictOptions
            set_optimizer_state_dict(model, optim, ckpt['optimizer'], options=StateDictOptions(full_state_dict=True))
        else:
            optim.load_state_dict(ckpt['optimizer'])
        if ckpt['scaler']:  # empty when the run was not float16: a fresh scaler then
            scaler.load_state_dict(ckpt['scaler'])
        rng = ckpt['rng']  # each rank's own generators (a rank beyond those saved keeps its seed + rank)
        if rank < len(rng['torch']):
            torch.set_rng_state(rng['torch'][rank])
        if device_type == 'cuda' and rank < len(rng['cuda']) and rng['cuda'][rank] is not None:
            torch.cuda.set_rng_state(rng['cuda'][rank], dev)
        ckpt = None  # free the memory
    raw_model = model
    if not fsdp:  # (under FSDP the blocks were compiled before sharding)
        model = maybe_compile(model, compile, device_type)
    if distributed and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
    peak = peak_flops or gpu_peak_flops(dev, amp_dtype)
    tokens_per_step = gradient_accumulation_steps * batch_size * T
    start_iter = iter_num
    if master:
        print(f"{raw_model.get_num_params():,} parameters | {tokens_per_step:,} tokens per step "
              f"({world_size} x {micro_steps} x {batch_size} x {T}) | {dev} {amp_dtype} | data {data_dir} ({meta['tokenizer']})")
        os.makedirs(out_dir, exist_ok=True)
        log_path = os.path.join(out_dir, 'log.jsonl')
        if init_from == 'resume' and os.path.exists(log_path):  # forget what came after the checkpoint
            with open(log_path, encoding='utf-8') as f:
                kept = [line for line in f if json.loads(line)['step'] <= iter_num]
            with open(log_path, 'w', encoding='utf-8') as f:
                f.writelines(kept)
        elif init_from != 'resume' and os.path.exists(log_path):
            os.remove(log_path)
        log_file = open(log_path, 'a', encoding='utf-8')

    def log_json(**row):
        log_file.write(json.dumps(row) + '\n')
        log_file.flush()

    def checkpoint():
        # every rank's own generators (CPU, and its GPU's for dropout there), so that a resumed run continues exactly
        mine = (torch.get_rng_state(), torch.cuda.get_rng_state(dev) if device_type == 'cuda' else None)
        rngs = [mine]
        if distributed:
            rngs = [None] * world_size
            torch.distributed.all_gather_object(rngs, mine)
        if fsdp:  # gathered whole onto rank 0's CPU, so that the checkpoint loads anywhere
            from torch.distributed.checkpoint.state_dict import get_state_dict, StateDictOptions
            model_sd, optim_sd = get_state_dict(raw_model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            model_sd, optim_sd = raw_model.state_dict(), optim.state_dict()
        return {'model': model_sd, 'model_args': model_args, 'tokenizer': tokenizer.spec,
                'config': config, 'iter_num': iter_num, 'best_val_loss': best_val_loss,
                'optimizer': optim_sd, 'fsdp': fsdp, 'scaler': scaler.state_dict(),
                'rng': {'torch': [r[0] for r in rngs], 'cuda': [r[1] for r in rngs]},
                'data': {'seed': data_seed, 'step': iter_num, 'order': run_order}}

    stop = {'signal': False}
    signal.signal(signal.SIGINT, lambda *_: stop.update(signal=True))  # finish the step, save, exit

    def stop_requested(local_flag):
        """True if this or (under torchrun) any process asks to stop: every rank stops at the same step."""
        return sum_across_ranks([float(local_flag)], comm_dev)[0] > 0

    one_pass = OnePass(splits['train'], T, data_seed) if run_order == 'one_pass' else None

    def batch_key(it, micro):  # unique per (step, micro-batch across all ranks)
        if one_pass is not None:  # the micro-batch's number in the whole run: consecutive windows of the epoch's order
            return (it * world_size + rank) * micro_steps + micro
        return (data_seed * 1_000_003 + it) * 4096 + rank * micro_steps + micro

    X, Y = get_batch(splits['train'], batch_key(iter_num, 0), T, dev, one_pass)
    t_log, it_log = time.time(), iter_num
    lossf = float('nan')
    while True:
        lr = get_lr(iter_num)
        for group in optim.param_groups:
            group['lr'] = lr * group.get('lr_scale', 1.0)
        interrupted = stop_requested(stop['signal']) if (not distributed or iter_num % log_interval == 0) else False
        at_end = iter_num >= max_iters or interrupted
        if (iter_num % eval_interval == 0 and (iter_num != start_iter or init_from != 'resume')) or at_end:
            dt_est = (time.time() - t_log) / max(1, iter_num - it_log)
            with torch.random.fork_rng(devices=[dev] if device_type == 'cuda' else []):  # eval leaves no trace
                losses = estimate_loss(raw_model, splits, T, dev, ctx, byte_counts, rank, world_size, comm_dev)
                if hellaswag:
                    losses['hellaswag'] = hellaswag_accuracy(raw_model, hellaswag, tokenizer, dev, ctx, rank, world_size,
                                                             comm_dev)
                sample = ''
                if sampling and sample_prompt:
                    prompt = torch.tensor([tokenizer.encode(sample_prompt)[-T:]], device=dev)
                    if fsdp:
                        raw_model.unshard()  # generate() calls the trunk directly, past the root's gathering hook
                    with ctx:
                        out = raw_model.eval().generate(prompt, sample_tokens, temperature=0)
                    if fsdp:
                        raw_model.reshard()
                    raw_model.train()
                    sample = tokenizer.decode(out[0, prompt.size(1):].tolist())
            if not all(math.isfinite(v) for v in losses.values()):  # the same sums on every rank: all stop
                die(NOT_FINITE.format(what="evaluation loss", step=iter_num, out_dir=out_dir))
            if master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
                      f"(perplexity {math.exp(min(losses['val'], 50)):.1f}, {losses['val_bpb']:.4f} bits per byte)"
                      + (f", HellaSwag acc_norm {100 * losses['hellaswag']:.2f}% of {len(hellaswag)}" if hellaswag else ""))
                if sample:
                    print(f"  sample: {sample_prompt + sample!r}")
                log_json(step=iter_num, train_loss=losses['train'], val_loss=losses['val'], val_bpb=losses['val_bpb'], lr=lr,
                         tokens_seen=iter_num * tokens_per_step, ms_per_step=None, tokens_per_s=None, mfu=None,
                         **({'hellaswag': losses['hellaswag']} if hellaswag else {}))
                best_val_loss = min(best_val_loss, losses['val'])
            # all ranks join the gathers; under FSDP not before the first step, as gathering an optimizer
            # without state would make one (a zero-gradient step that advances Adam's step count)
            ck = None if fsdp and not optim.state else checkpoint()
            if master and ck is not None:
                save_checkpoint(ck, os.path.join(out_dir, 'ckpt.pt'))
            if at_end:
                break
            t_log = time.time() - (iter_num - it_log) * dt_est  # eval time is not step time
        # one optimizer step: micro_steps micro-batches, gradients averaged (and synced across ranks once)
        for micro in range(micro_steps):
            if fsdp:
                raw_model.set_requires_gradient_sync(micro == micro_steps - 1)
            elif distributed:
                model.require_backward_grad_sync = micro == micro_steps - 1  # all-reduce only after the last micro-batch
            with ctx:
                _, loss = model(X, Y)
                loss = loss / micro_steps  # the sum over micro-batches is then the mean
            next_key = batch_key(iter_num, micro + 1) if micro + 1 < micro_steps else batch_key(iter_num + 1, 0)
            X, Y = get_batch(splits['train'], next_key, T, dev, one_pass)  # fetched while the GPU works
            scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optim)
            total_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optim)
        scaler.update()
        optim.zero_grad(set_to_none=True)
        iter_num += 1
        if iter_num == start_iter + 1 and iter_num % log_interval:  # the first step compiles and warms up: not timed
            t_log, it_log = time.time(), iter_num
        if iter_num % log_interval == 0:
            lossf = loss.item() * micro_steps  # .item() waits for the GPU: only here, at log steps
            if stop_requested(not math.isfinite(lossf)):
                die(NOT_FINITE.format(what=f"training loss ({lossf})", step=iter_num, out_dir=out_dir))
            if grad_clip:  # under FSDP the norm is a sharded tensor: gathering it is a collective, on every rank
                grad_norm = float(total_norm.full_tensor() if fsdp else total_norm)
            if master:
                dt = (time.time() - t_log) / (iter_num - it_log)
                t_log, it_log = time.time(), iter_num
                tok_s = tokens_per_step / dt
                mfu = raw_model.estimate_mfu(tok_s / world_size, peak)
                gn = f" | grad norm {grad_norm:.2f}" if grad_clip else ""
                print(f"step {iter_num} | loss {lossf:.4f} | lr {lr:.2e}{gn} | {dt * 1000:.0f} ms/step | "
                      f"{tok_s:,.0f} tok/s" + (f" | MFU {100 * mfu:.1f}%" if mfu else ""))
                log_json(step=iter_num, train_loss=lossf, val_loss=None, val_bpb=None, lr=lr, tokens_seen=iter_num * tokens_per_step,
                         ms_per_step=dt * 1000, tokens_per_s=tok_s, mfu=mfu)
    if master:
        log_file.close()
        if interrupted:
            print(f"interrupted: saved step {iter_num} to {out_dir}/ckpt.pt; continue with --init_from=resume")
        else:
            save_loss_plot(os.path.join(out_dir, 'log.jsonl'), os.path.join(out_dir, 'loss.png'))
            print(f"done: {out_dir}/ckpt.pt (step {iter_num}); try python sample.py --out_dir={out_dir}")
    if distributed:
        torch.distributed.barrier()  # no process tears gloo/nccl down while another still talks to it
        torch.distributed.destroy_process_group()
    if interrupted:
        sys.exit(130)


if __name__ == '__main__':
    configure(globals())
    main()
