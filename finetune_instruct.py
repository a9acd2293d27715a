"""
Fine-tune a GPT to follow instructions, generate its test responses and have them judged (book chapter 7).
    python finetune_instruct.py                                    # gpt2-medium on the book's 1,100 instructions
    python finetune_instruct.py --init_from=out --judge=none       # your own pretrained checkpoint
    python finetune_instruct.py --lora_rank=16 --prompt_style=phi3
    python finetune_instruct.py --init_from=qwen3-0.6b-base --prompt_style=chatml --lora_rank=16   # the Llama family
    python sample.py --out_dir=out-instruct --start="Rewrite the sentence using a simile: The car is fast."
"""
import copy
import json
import os
import re
import sys
import time
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F

from configurator import configure, run_config, setup, die, maybe_compile, optimizer_step
from model import (FUSED_ADAMW_DEVICES, GPTConfig, apply_lora, generate_batch, lora_disabled, merge_lora, pad_rows,
                   token_logprobs)
from quantize import cast_and_quantize, talk_dtype
from weights import download, load_pretrained, save_checkpoint, save_json
from tokenizer import PROMPT_STYLES, format_input, format_prompt, get_tokenizer, response_end_id
from prepare_data import read_entries

method = 'sft'  # sft: supervised instruction tuning (7.2-7.6); dpo: preference tuning of an SFT model (the bonus)
# data
data = ''  # a JSON list (or JSONL) of {instruction, input, output} (+ chosen, rejected for dpo); '' = the book's file
data_dir = 'data/instruct'  # where the book's file is downloaded to
prompt_style = 'alpaca'  # alpaca (the book's), phi3 (exercise 7.1), llama3, chatml (Qwen, SmolLM2) or gemma
allowed_max_length = 1024  # truncate longer examples (tokens)
mask_inputs = False  # also mask the prompt from the loss: learn only the responses (exercise 7.2)
# model
init_from = 'gpt2-medium'  # a GPT-2 size, qwen3-0.6b, a hub id, resume (out_dir/ckpt.pt), scratch, a ckpt.pt or folder
n_layer = 4  # for init_from=scratch
n_head = 4
n_embd = 128
block_size = 1024
dropout = 0.0
lora_rank = 0  # > 0: train LoRA adapters of this rank instead of all weights (merged at save)
lora_alpha = 16
# training (the book's settings)
out_dir = 'out-instruct'
learning_rate = 5e-5
weight_decay = 0.1
num_epochs = 2
batch_size = 8
max_iters = 0  # stop after this many steps (0 = run all epochs)
eval_interval = 5
eval_iters = 5
grad_clip = 0.0
beta = 0.1  # dpo: how far the policy may move from the reference (the book's 0.1)
dpo_learning_rate = 5e-6  # dpo: the book's learning rate (learning_rate is SFT's)
seed = 123
device = 'auto'
dtype = 'auto'
compile = False
# responses and judging
eval_limit = 0  # generate responses for the first N test entries only (0 = all)
max_new_tokens = 256
gen_batch_size = 8  # test responses generated at once (left-padded; each equals its prompt's answer alone)
quantize = 'none'  # int8 or int4: the test responses from those weights (quantize.py), as sample.py --quantize talks
judge = 'ollama'  # ollama (an Ollama-compatible /api/chat), openai (OpenAI-compatible, judge_url ending in /v1) or none
judge_url = 'http://localhost:11434'
judge_model = 'llama3'

BOOK = 'https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main'
DATA = {  # method: (url, file name, sha256) of the book's data sets
    'sft': (f'{BOOK}/ch07/01_main-chapter-code/instruction-data.json', 'instruction-data.json',
            '7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944'),
    'dpo': (f'{BOOK}/ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json',
            'instruction-data-with-preference.json',
            '305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e'),
}


# -------------------------------------------------------------------- data (ch07 7.2-7.3)

def split_entries(entries):
    """The book's split, in its own (already shuffled) order: 85% train, 10% test, 5% val."""
    a, b = int(0.85 * len(entries)), int(0.85 * len(entries)) + int(0.1 * len(entries))
    return {'train': entries[:a], 'test': entries[a:b], 'val': entries[b:]}


def encode_entry(entry, tokenizer, style):
    """(token ids of prompt + response, prompt length in tokens)."""
    prompt = tokenizer.encode(format_prompt(entry, style))
    return prompt + tokenizer.encode(entry['output']), len(prompt)


def collate(batch, pad_id, allowed_max_length=None, mask_inputs=False, device='cpu'):
    """The book's custom_collate_fn: pad every example with end-of-text to the longest + 1,
    inputs x = tokens[:-1], targets y = tokens[1:]; in y only the first end-of-text (the
    response's end) is kept, the rest of the padding is -100, ignored by the loss. With
    mask_inputs the prompt is ignored too. batch: [(ids, prompt_len)] -> x, y (B, T)."""
    def targets(ids, prompt_len):  # y[j] is token j+1, ending with the one end-of-text the model must learn to emit
        y = ids[1:] + [pad_id]
        return [-100] * (prompt_len - 1) + y[prompt_len - 1:] if mask_inputs else y  # the prompt is not a target
    x = pad_rows([ids for ids, _ in batch], pad_id)
    y = pad_rows([targets(ids, prompt_len) for ids, prompt_len in batch], -100)
    if allowed_max_length:
        x, y = x[:, :allowed_max_length], y[:, :allowed_max_length]
    return x.to(device), y.to(device)


def batches(encoded, shuffle_gen=None):
    order = torch.randperm(len(encoded), generator=shuffle_gen).tolist() if shuffle_gen else list(range(len(encoded)))
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        if shuffle_gen is not None and len(chunk) < batch_size and i:
            break  # drop_last for training, as the book
        yield [encoded[j] for j in chunk]


@torch.no_grad()
def evaluate(model, encoded, pad_id, max_len, dev, ctx, num_batches=None):
    """Mean loss over the first num_batches batches (all if None)."""
    model.eval()
    losses = []
    for batch in islice(batches(encoded), num_batches):
        with ctx:
            losses.append(model(*collate(batch, pad_id, max_len, mask_inputs, dev))[1].item())
    model.train()
    return sum(losses) / max(len(losses), 1)


def respond_batch(model, entries, tokenizer, style, dev, ctx, max_new):
    """The model's responses to several entries at once (7.7): greedy, each ending at the style's end of a response."""
    prompts = [tokenizer.encode(format_prompt(entry, style))[-model.config.block_size:] for entry in entries]
    end_id = response_end_id(tokenizer, style)
    with ctx:
        rows = generate_batch(model, prompts, end_id, max_new)
    return [tokenizer.decode([t for t in row if t != end_id]).strip() for row in rows]


def respond(model, entry, tokenizer, style, dev, ctx, max_new):
    """The model's response to one entry."""
    return respond_batch(model, [entry], tokenizer, style, dev, ctx, max_new)[0]


# -------------------------------------------------------------------- preference tuning (DPO, the ch07 bonus)

def encode_pair(entry, tokenizer, style):
    """(prompt ids, chosen response ids, rejected response ids)."""
    return (tokenizer.encode(format_prompt(entry, style)), tokenizer.encode(entry['chosen']),
            tokenizer.encode(entry['rejected']))


def response_logprob(model, x, y):
    """log p(response | prompt) per row (B,): the sum of the target tokens' log-probabilities."""
    return token_logprobs(model, x, y)[0].sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Direct Preference Optimization: -log sigmoid of beta times how much more the policy
    than the reference prefers chosen over rejected. log(2) when policy == reference.
    Also returns the implicit rewards beta * log(policy / reference) of each side."""
    chosen, rejected = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


def dpo_batch(model, reference, batch, pad_id, max_len, dev):
    """(loss, chosen rewards, rejected rewards) of a batch of encode_pair triples. The prompt is
    always masked: only the responses are compared. reference=None: the policy with its LoRA
    adapters switched off is the reference (no second copy of the model)."""
    xc, yc = collate([(p + c, len(p)) for p, c, _ in batch], pad_id, max_len, True, dev)
    xr, yr = collate([(p + r, len(p)) for p, _, r in batch], pad_id, max_len, True, dev)
    policy_c, policy_r = response_logprob(model, xc, yc), response_logprob(model, xr, yr)
    with torch.no_grad(), lora_disabled(model):
        ref = reference or model
        ref_c, ref_r = response_logprob(ref, xc, yc), response_logprob(ref, xr, yr)
    return dpo_loss(policy_c, policy_r, ref_c, ref_r, beta)


@torch.no_grad()
def dpo_evaluate(model, reference, encoded, pad_id, max_len, dev, ctx, num_batches=None):
    """Mean DPO loss, reward margin (chosen - rejected) and reward accuracy (chosen > rejected)."""
    model.eval()
    losses, margins, wins = [], [], []
    for batch in islice(batches(encoded), num_batches):
        with ctx:
            loss, chosen, rejected = dpo_batch(model, reference, batch, pad_id, max_len, dev)
        losses.append(loss.item())
        margins.extend((chosen - rejected).tolist())
        wins.extend((chosen > rejected).float().tolist())
    model.train()
    return {'loss': sum(losses) / len(losses), 'reward_margin': sum(margins) / len(margins),
            'reward_accuracy': sum(wins) / len(wins)}


# -------------------------------------------------------------------- judging (ch07 7.8)

def judge_prompt(entry):
    """The book's scoring prompt (7.8)."""
    return (f"Given the input `{format_input(entry)}` "
            f"and correct output `{entry['output']}`, "
            f"score the model response `{entry['model_response']}`"
            f" on a scale from 0 to 100, where 100 is the best score. "
            f"Respond with the integer number only.")


def query_judge(prompt, url, model, timeout=120):
    """Ask an Ollama-compatible /api/chat, as the book does (seed 123, temperature 0), and join
    its streamed answer (one JSON object per line)."""
    import requests
    payload = {'model': model, 'messages': [{'role': 'user', 'content': prompt}],
               'options': {'seed': 123, 'temperature': 0, 'num_ctx': 2048}}
    with requests.post(f"{url.rstrip('/')}/api/chat", json=payload, stream=True, timeout=timeout) as r:
        if r.status_code != 200:
            raise OSError(f"the judge at {url} answered HTTP {r.status_code}: {r.text[:100]!r}"
                          + (f"; is the model pulled (ollama pull {model})?" if r.status_code == 404 else ""))
        text = []
        for line in r.iter_lines():
            if line:
                chunk = json.loads(line)
                text.append(chunk.get('message', {}).get('content', ''))
                if chunk.get('done'):
                    break
    return ''.join(text)


def query_openai_judge(prompt, url, model, timeout=120):
    """Ask any OpenAI-compatible chat API (url ends in /v1: vLLM, llama.cpp, Ollama's /v1, sample.py --serve,
    OpenAI itself with $OPENAI_API_KEY) with the same settings as query_judge."""
    import requests
    key = os.environ.get('OPENAI_API_KEY')
    payload = {'model': model, 'messages': [{'role': 'user', 'content': prompt}], 'seed': 123, 'temperature': 0}
    r = requests.post(f"{url.rstrip('/')}/chat/completions", json=payload, timeout=timeout,
                      headers={'Authorization': f'Bearer {key}'} if key else {})
    if r.status_code != 200:
        hint = {401: '; set OPENAI_API_KEY', 404: f'; is {url} the API\'s base URL (ending in /v1)?'}
        raise OSError(f"the judge at {url} answered HTTP {r.status_code}: {r.text[:100]!r}"
                      + hint.get(r.status_code, ''))
    try:
        return r.json()['choices'][0]['message']['content'] or ''
    except (ValueError, KeyError, IndexError, TypeError):
        raise OSError(f"the judge at {url} did not answer like an OpenAI chat API: {r.text[:100]!r}") from None


def parse_score(text):
    """The first whole number 0-100 in the judge's answer ("Score: 85." -> 85), else None."""
    for m in re.finditer(r'(?<![\d.])(\d{1,3})(?![\d.]\d)', text):
        if 0 <= int(m.group(1)) <= 100:
            return int(m.group(1))
    return None


def score_responses(entries, url, model, kind='ollama'):
    """[score or None] for each entry with a model_response, from an ollama or openai(-compatible) judge; OSError
    if the judge is unreachable."""
    import requests
    scores = []
    for i, entry in enumerate(entries):
        try:
            answer = (query_openai_judge if kind == 'openai' else query_judge)(judge_prompt(entry), url, model)
        except (requests.ConnectionError, requests.Timeout) as e:
            start = ("start an OpenAI-compatible server there" if kind == 'openai'
                     else f"start Ollama (ollama serve; ollama pull {model})")
            raise OSError(f"the judge at {url} is unreachable ({type(e).__name__}); {start} "
                          "or use --judge=none") from None
        scores.append(parse_score(answer))
        print(f"\rscoring {i + 1}/{len(entries)}", end='', file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return scores


def judge_responses(test, metrics):
    """The judge's scores, added to out_dir's test_responses.json and metrics.json."""
    try:
        scores = score_responses(test, judge_url, judge_model, judge)
    except OSError as e:
        die(e)
    valid = [s for s in scores if s is not None]
    for entry, score in zip(test, scores):
        entry['judge_score'] = score
    write_json('test_responses.json', test)
    metrics.update(judge_score=sum(valid) / len(valid) if valid else None, judge_scored=len(valid),
                   judge_model=judge_model)
    write_json('metrics.json', metrics)
    print(f"judge {judge_model}: average score {metrics['judge_score']} over {len(valid)} of {len(test)} responses"
          + (f" ({len(test) - len(valid)} answers held no number)" if len(valid) < len(test) else ""))


# -------------------------------------------------------------------- the run

def write_json(name, obj):
    save_json(Path(out_dir) / name, obj)


def save_responses(model, test, tokenizer, dev, ctx):
    """The test entries with their model_response (ch07 7.7), also written to out_dir/test_responses.json."""
    for i in range(0, len(test), gen_batch_size):
        batch = test[i:i + gen_batch_size]
        responses = respond_batch(model, batch, tokenizer, prompt_style, dev, ctx, max_new_tokens)
        for entry, response in zip(batch, responses):
            entry['model_response'] = response
        print(f"\rresponses {i + len(batch)}/{len(test)}", end='', file=sys.stderr, flush=True)
    print(file=sys.stderr)
    write_json('test_responses.json', test)
    return test


def load_splits():
    """The train/test/val entries of --data, or of the book's file for --method."""
    try:
        url, name, sha = DATA[method]
        path = data or download(url, Path(data_dir) / name, sha256=sha)
        fields = ('instruction', 'input', 'output') + (('chosen', 'rejected') if method == 'dpo' else ())
        splits = split_entries(read_entries(path, fields))
    except (OSError, ValueError) as e:
        die(e)
    if min(len(s) for s in splits.values()) == 0:
        die(f"{path} has too few entries ({sum(map(len, splits.values()))}) to split 85/10/5; give at least 20")
    return splits


def load_model():
    """(model on the CPU, its tokenizer, the padding id) of --init_from."""
    scratch = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=50257,
                        dropout=dropout)  # GPT-2's tokenizer
    try:
        model, info = load_pretrained(init_from, torch.float32, out_dir, scratch, dropout=dropout)
        tokenizer = get_tokenizer(info['tokenizer'])
        # padding, and the first pad the target the model learns to stop with: end-of-text (alpaca, phi3),
        # or the chat format's end of a turn (<|eot_id|>, <|im_end|>)
        return model, tokenizer, response_end_id(tokenizer, prompt_style)
    except (OSError, ValueError) as e:
        die(e)


def main():
    config = run_config(globals())  # what this run was asked to do, for the checkpoint
    dev, device_type, amp_dtype, ctx = setup(device, dtype, seed)
    if prompt_style not in PROMPT_STYLES:
        die(f"--prompt_style={prompt_style}: use {', '.join(PROMPT_STYLES)}")
    if judge not in ('ollama', 'openai', 'none'):
        die(f"--judge={judge}: use ollama, openai or none")
    if method not in DATA:
        die(f"--method={method}: use sft or dpo (GRPO is finetune_grpo.py)")
    if gen_batch_size < 1:
        die(f"--gen_batch_size={gen_batch_size}: give at least 1")
    try:
        talk_dtype(quantize, device_type, amp_dtype)  # an unknown scheme stops before training
    except ValueError as e:
        die(e)
    splits = load_splits()
    model, tokenizer, pad_id = load_model()
    reference = None  # dpo: the frozen model the policy is measured against
    if method == 'dpo' and lora_rank == 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False).to(dev)
    if lora_rank > 0:
        apply_lora(model, lora_rank, lora_alpha)  # only the adapters train
    model.to(dev)
    max_len = min(allowed_max_length, model.config.block_size)  # longer examples are truncated
    train_model = maybe_compile(model, compile, device_type)
    encode = encode_pair if method == 'dpo' else encode_entry
    enc = {name: [encode(e, tokenizer, prompt_style) for e in entries] for name, entries in splits.items()}

    def batch_loss(batch):  # the DPO loss, or the next-token loss of the book's calc_loss_batch
        return (dpo_batch(train_model, reference, batch, pad_id, max_len, dev)[0] if method == 'dpo'
                else train_model(*collate(batch, pad_id, max_len, mask_inputs, dev))[1])

    def measure(split, n=None):  # {loss} for sft; dpo adds the rewards' margin and accuracy
        return (dpo_evaluate(model, reference, enc[split], pad_id, max_len, dev, ctx, n) if method == 'dpo'
                else {'loss': evaluate(model, enc[split], pad_id, max_len, dev, ctx, n)})
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{sum(map(len, splits.values()))} entries: {len(splits['train'])} train, {len(splits['val'])} val, "
          f"{len(splits['test'])} test ({method}, {prompt_style} prompts{', inputs masked' if mask_inputs else ''})\n"
          f"{init_from}: {model.get_num_params():,} parameters, {n_train:,} trainable"
          f"{f' (LoRA rank {lora_rank})' if lora_rank else ''}; {dev} {amp_dtype}")

    params = [p for p in model.parameters() if p.requires_grad]
    lr = dpo_learning_rate if method == 'dpo' else learning_rate
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device_type in FUSED_ADAMW_DEVICES)
    scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == 'float16')
    shuffle = torch.Generator().manual_seed(seed)
    show = splits['val'][0]  # the book prints the response to the first val entry as it trains
    fmt = lambda m: ', '.join(f"{k} {v:.3f}" for k, v in m.items())  # noqa: E731
    step, t0, before = 0, time.time(), measure('val')
    print(f"before training: val {fmt(before)}")
    for epoch in range(num_epochs):  # train_model_simple (7.6), or the bonus's train_model_dpo_simple
        for batch in batches(enc['train'], shuffle):
            with ctx:
                loss = batch_loss(batch)
            optimizer_step(loss, optimizer, scaler, params, grad_clip)
            step += 1
            if step % eval_interval == 0:
                print(f"epoch {epoch + 1} step {step}: train {fmt(measure('train', eval_iters))} | "
                      f"val {fmt(measure('val', eval_iters))} ({(time.time() - t0) / step * 1000:.0f} ms/step)")
            if max_iters and step >= max_iters:
                break
        print(f"  {show['instruction'][:60]!r} -> {respond(model, show, tokenizer, prompt_style, dev, ctx, 35)!r}")
        if max_iters and step >= max_iters:
            break
    after = measure('val')
    print(f"trained {step} steps in {(time.time() - t0) / 60:.1f} min; val {fmt(after)}")
    save_checkpoint(Path(out_dir) / 'ckpt.pt', model, tokenizer.spec, config, prompt_style=prompt_style,
                    method=method, iter_num=step)
    del optimizer, params  # the optimizer's state (two float32 copies of what trained) and the DPO reference are
    reference = None  # no longer needed: the test responses need only the model
    if quantize != 'none':  # as sample.py --quantize talks with the checkpoint just saved: merged, cast, quantized
        cast_and_quantize(merge_lora(model), quantize, device_type, amp_dtype)
    test = save_responses(model, splits['test'][:eval_limit or None], tokenizer, dev, ctx)  # kept if the judge fails
    metrics = {'method': method, 'val_loss': after['loss'], 'val_loss_before': before['loss'], 'judge_score': None,
               'steps': step, 'test_responses': len(test)}
    if method == 'dpo':  # measured on the val split, before and after
        metrics.update({k: after[k] for k in ('reward_accuracy', 'reward_margin')},
                       reward_accuracy_before=before['reward_accuracy'], reward_margin_before=before['reward_margin'])
    write_json('metrics.json', metrics)
    print(f"saved {out_dir}/ckpt.pt and {len(test)} responses in {out_dir}/test_responses.json")
    if judge != 'none':
        judge_responses(test, metrics)


if __name__ == '__main__':
    configure(globals())
    main()
