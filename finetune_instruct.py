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
from collections import Counter
from fractions import Fraction
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F

from configurator import configure, config_keys, setup, die, maybe_compile, optimizer_step, save_text, quantized_dtype
from model import FUSED_ADAMW_DEVICES, GPT, GPTConfig, apply_lora, merge_lora, merged_state_dict, QUANTIZERS, set_lora_enabled
from weights import download, load_checkpoint, load_pretrained, save_checkpoint
from tokenizer import PROMPT_STYLES, format_input, format_prompt, get_tokenizer, response_end_id

method = 'sft'  # sft: supervised instruction tuning (7.2-7.6); dpo: preference tuning of an SFT model (the bonus); grpo: RL with a verifier (the sequel)
# data
data = ''  # a JSON list (or JSONL) of {instruction, input, output} (+ chosen, rejected for dpo; {problem, answer} for grpo); '' = the book's file (grpo: math_train)
data_dir = 'data/instruct'  # where the book's file is downloaded to
prompt_style = 'alpaca'  # alpaca (the book's), phi3 (exercise 7.1), llama3 or chatml (Qwen, SmolLM2: their chat formats)
allowed_max_length = 1024  # truncate longer examples (tokens)
mask_inputs = False  # also mask the prompt from the loss: learn only the responses (exercise 7.2)
# model
init_from = 'gpt2-medium'  # a GPT-2 size, qwen3-0.6b / smollm2-135m / a hub id, resume (out_dir/ckpt.pt), scratch, a ckpt.pt / HF folder
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
max_iters = 0  # stop after this many steps (0 = run all epochs; grpo: one pass over data)
eval_interval = 5
eval_iters = 5
grad_clip = 0.0
beta = 0.1  # dpo: how far the policy may move from the reference (the book's 0.1)
dpo_learning_rate = 5e-6  # dpo: the book's learning rate (learning_rate is SFT's)
# grpo: reinforcement learning with verifiable rewards (the sequel's chapter 6); batch_size problems a step
test_data = 'math500'  # grpo: held-out {problem, answer} file (or math500, math500_jsonl) evaluated before and at each eval
verifier = 'math'  # grpo: math (the last \boxed{}, else the last number, normalised) or exact (the last line, generated tasks)
problem_prompt = 'auto'  # grpo: sequel (its MATH prompt), plain (the problem as pretraining text) or auto (plain for our own models)
group_size = 8  # grpo: completions sampled per problem
temperature = 1.0  # grpo: sampling temperature, also of the update's log-probs and of self-consistency's samples
kl_beta = 0.0  # grpo: weight of a KL penalty to the starting model (the sequel found none best)
grpo_learning_rate = 1e-5  # grpo: 10-50x below pretraining's (a GRPO step moves weights further than its lr suggests)
sc_k = 8  # grpo: self-consistency@k (a majority vote over k samples) at each evaluation; 0 = greedy accuracy only
eval_only = False  # grpo: evaluate --init_from on test_data (greedy and self-consistency) and exit
seed = 123
device = 'auto'
dtype = 'auto'
compile = False
# responses and judging
eval_limit = 0  # generate responses for the first N test entries only (0 = all; grpo: test problems evaluated)
max_new_tokens = 256
gen_batch_size = 8  # test responses generated at once (left-padded; each equals its prompt's answer alone)
quantize = 'none'  # int8 or int4: the test responses from those weights (model.QUANTIZERS), as sample.py --quantize talks
judge = 'ollama'  # ollama (an Ollama-compatible /api/chat), openai (OpenAI-compatible, judge_url ending in /v1) or none
judge_url = 'http://localhost:11434'
judge_model = 'llama3'

DATA = {  # method: (url, file name, sha256) of the book's data sets
    'sft': ('https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json',
            'instruction-data.json', '7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944'),
    'dpo': ('https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/'
            'instruction-data-with-preference.json',
            'instruction-data-with-preference.json', '305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e'),
}
PROBLEM_SETS = {  # grpo's {problem, answer} sets by name: (url, file name); no checksums are published for them
    'math500': ('https://raw.githubusercontent.com/rasbt/reasoning-from-scratch/main/ch03/01_main-chapter-code/'
                'math500_test.json', 'math500_test.json'),  # the sequel's JSON list
    'math500_jsonl': ('https://huggingface.co/datasets/HuggingFaceH4/MATH-500/resolve/main/test.jsonl',
                      'math500_test.jsonl'),  # the published JSON-lines test set
    'math_train': ('https://raw.githubusercontent.com/rasbt/math_full_minus_math500/refs/heads/main/'
                   'math_full_minus_math500.json', 'math_full_minus_math500.json'),  # the sequel's 12,000 for training
}


# -------------------------------------------------------------------- data (ch07 7.2-7.3)

def read_entries(path, required=('instruction', 'input', 'output')):
    """Entries from a JSON list or JSONL file; one missing a field stops with its index."""
    path = Path(path)
    try:
        text = path.read_text(encoding='utf-8')
    except FileNotFoundError:
        raise FileNotFoundError(f"--data={path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start})") from None
    try:
        entries = json.loads(text) if text.lstrip().startswith('[') else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is neither a JSON list nor JSON lines ({e.msg} at line {e.lineno})") from None
    if not entries:
        raise ValueError(f"{path} holds no entries")
    for i, entry in enumerate(entries):
        missing = [k for k in required if not isinstance(entry, dict) or not isinstance(entry.get(k), str)]
        if missing or not entry[required[0]].strip():
            raise ValueError(f"{path} entry {i}: missing or empty {', '.join(missing) or required[0]}")
    return entries


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
    T = max(len(ids) for ids, _ in batch) + 1
    x = torch.full((len(batch), T - 1), pad_id, dtype=torch.long)
    y = torch.full((len(batch), T - 1), -100, dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(batch):
        seq = torch.tensor(ids + [pad_id])
        x[i, :len(ids)] = seq[:-1]
        y[i, :len(ids)] = seq[1:]  # ends with the one end-of-text the model must learn to emit
        if mask_inputs:
            y[i, :prompt_len - 1] = -100  # y[j] is token j+1: the prompt's tokens are not targets
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


@torch.no_grad()
def generate_batch(model, prompts, end_id, dev, ctx, max_new, temperature=0.0, generator=None):
    """Continuations of several token-id prompts at once: KV cache, each row stops at end_id (kept as the
    row's last token; a row without it never ended). Prompts of different lengths are left-padded (the padding
    is never attended to, and each row's positions start at its first token), so each row equals its prompt's
    continuation alone. temperature=0 is greedy."""
    longest = max(len(ids) for ids in prompts)
    x = torch.tensor([[end_id] * (longest - len(ids)) + ids for ids in prompts], device=dev)  # (B, longest)
    padding = torch.tensor([longest - len(ids) for ids in prompts], device=dev)
    was_training = model.training
    model.eval()  # no dropout while answering (evaluate() leaves the model in training mode)
    with ctx:
        out = model.generate(x, max_new, temperature=temperature, eos_id=end_id, padding=padding,
                             generator=generator)[:, longest:].tolist()
    model.train(was_training)
    return [row[:row.index(end_id) + 1] if end_id in row else row for row in out]  # what follows the end is padding


def respond_batch(model, entries, tokenizer, style, dev, ctx, max_new):
    """The model's responses to several entries at once (7.7): greedy, each stopping at the style's end of a response."""
    prompts = [tokenizer.encode(format_prompt(entry, style))[-model.config.block_size:] for entry in entries]
    end_id = response_end_id(tokenizer, style)
    rows = generate_batch(model, prompts, end_id, dev, ctx, max_new)
    return [tokenizer.decode([t for t in row if t != end_id]).strip() for row in rows]


def respond(model, entry, tokenizer, style, dev, ctx, max_new):
    """The model's response to one entry."""
    return respond_batch(model, [entry], tokenizer, style, dev, ctx, max_new)[0]


# -------------------------------------------------------------------- preference tuning (DPO, the ch07 bonus)

def encode_pair(entry, tokenizer, style):
    """(prompt ids, chosen response ids, rejected response ids)."""
    return (tokenizer.encode(format_prompt(entry, style)), tokenizer.encode(entry['chosen']),
            tokenizer.encode(entry['rejected']))


def token_logprobs(model, x, y, temperature=1.0):
    """(log-probabilities of y's tokens (B, T), 0 where y is -100 (the prompt and the padding); that mask (B, T)),
    of the distribution at `temperature` (GRPO scores its samples at the temperature they were drawn at)."""
    logits, _ = model(x)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    mask = y != -100
    return logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask, mask


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
    with torch.no_grad():
        if reference is None:
            set_lora_enabled(model, False)
        ref = reference or model
        ref_c, ref_r = response_logprob(ref, xc, yc), response_logprob(ref, xr, yr)
        if reference is None:
            set_lora_enabled(model, True)
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


# -------------------------------------------------------------------- verifiers (the sequel's chapter 3)

def last_boxed(text):
    """The contents of the last \\boxed{...} (or \\fbox{...}) in text, braces balanced, or None."""
    start = max(text.rfind('\\boxed{'), text.rfind('\\fbox{'))
    if start < 0:
        return None
    i, depth = text.index('{', start), 0
    for j in range(i, len(text)):
        depth += {'{': 1, '}': -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # never closed: the completion was cut off


NUMBER = re.compile(r'-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+')


def extract_math(completion):
    """The final answer of a math completion: the last \\boxed{}, else the last number, else None."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    numbers = NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def unwrap_frac(s):
    """\\frac{a}{b} -> a/b, the parts in parentheses when they are more than one term ((a+1)/b)."""
    while (m := re.search(r'\\frac\{([^{}]*)\}\{([^{}]*)\}|\\frac(\w)(\w)', s)):
        a, b = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        a, b = (f"({t})" if re.search(r'[+\-*/ ]', t.lstrip('-')) else t for t in (a, b))
        s = s[:m.start()] + f"{a}/{b}" + s[m.end():]
    return s


def normalize_math(answer):
    """A math answer in one canonical spelling, so that equal answers compare equal as strings: no spaces, $,
    \\left/\\right, units in \\text{}, degrees or percent signs; \\dfrac and \\tfrac are \\frac, and \\frac{a}{b}
    is a/b; thousands commas and a trailing .0 go; a plain number or ratio becomes its reduced fraction
    (0.5, 1/2 and \\frac{2}{4} all read 1/2). No computer algebra: 2x+2 and 2(x+1) stay different."""
    s = answer.strip()
    for old, new in (('\\left', ''), ('\\right', ''), ('\\!', ''), ('\\,', ''), ('\\;', ''), ('\\ ', ''),
                     ('\\dfrac', '\\frac'), ('\\tfrac', '\\frac'), ('$', ''), ('\\%', ''), ('%', ''),
                     ('^{\\circ}', ''), ('^\\circ', ''), ('\\displaystyle', '')):
        s = s.replace(old, new)
    units = r'\\(?:text|mbox|mathrm)\{[^{}]*\}'
    s = re.sub(units, '', s) if re.sub(units, '', s).strip() else re.sub(r'\\(?:text|mbox|mathrm)\{([^{}]*)\}', r'\1', s)
    s = re.sub(r'\s+', '', s)
    s = re.sub(r'^[a-zA-Z]=(?!=)', '', s)  # x=5 -> 5
    s = re.sub(r'\\sqrt(\w)', r'\\sqrt{\1}', s)
    s = unwrap_frac(s).rstrip('.')
    while re.search(r'(\d),(\d{3})(?!\d)', s):
        s = re.sub(r'(\d),(\d{3})(?!\d)', r'\1\2', s)
    s = re.sub(r'(\d)\.0+(?!\d)', r'\1', s)
    if re.fullmatch(r'\(?-?(\d+\.?\d*|\.\d+)\)?(/\(?\d+\)?)?', s):
        try:
            s = str(Fraction(s.replace('(', '').replace(')', '')))
        except (ValueError, ZeroDivisionError):
            pass
    return s


def extract_exact(completion):
    """The final answer of a generated task's completion: its last non-empty line (the end token aside)."""
    lines = [line.strip() for line in completion.splitlines() if line.strip()]
    return lines[-1] if lines else None


VERIFIERS = {'math': (extract_math, normalize_math), 'exact': (extract_exact, str.strip)}


def is_correct(completion, answer, verifier):
    """Whether a completion's final answer equals the reference answer, both read by the verifier."""
    extract, normalize = VERIFIERS[verifier]
    got = extract(completion)
    return got is not None and normalize(got) == normalize(answer)


def reward(ids, answer, end_id, tokenizer, verifier):
    """1.0 for a completion (token ids) that ended and whose answer the verifier finds right, else 0.0: one cut
    off by max_new_tokens is wrong whatever it holds, so a model cannot win by never stopping."""
    return float(ids[-1:] == [end_id] and is_correct(tokenizer.decode(ids[:-1]), answer, verifier))


# -------------------------------------------------------------------- problems and prompts (the sequel's chapter 3)

def load_problems(source, folder):
    """[{problem, answer}] from a JSON list or JSON lines file, or one of PROBLEM_SETS by name (downloaded once
    into folder): the sequel's math500_test.json and the JSON-lines MATH-500 test set both load as they are."""
    if source in PROBLEM_SETS:
        url, name = PROBLEM_SETS[source]
        source = download(url, Path(folder) / name)
    return read_entries(source, ('problem', 'answer'))


def own_model(source):
    """Whether source is a model of ours (scratch, or a checkpoint train.py or this script wrote)."""
    path = Path(source)
    return source in ('scratch', 'resume') or path.suffix == '.pt' or (path / 'ckpt.pt').is_file()


def format_problem(entry, kind):
    """The text a model continues with its solution: the sequel's prompt (for published models) or, for our
    own, the problem as it opens a document of pretraining text (prepare_data.worked_addition)."""
    if kind == 'sequel':
        return ("You are a helpful math assistant.\nAnswer the question and write the final result on a new "
                f"line as:\n\\boxed{{ANSWER}}\n\nQuestion:\n{entry['problem']}\n\nAnswer:")
    return entry['problem'] + '\n'


def encode_problem(entry, tokenizer, kind, room):
    """The prompt's token ids, its start cropped so that room tokens of completion still fit; our own models
    read each document after an end-of-text, so the plain prompt opens with one."""
    ids = ([tokenizer.eot_id] if kind == 'plain' else []) + tokenizer.encode(format_problem(entry, kind))
    return ids[-room:]


# -------------------------------------------------------------------- GRPO (the sequel's chapter 6)

def group_advantages(rewards, group_size):
    """(N,) rewards of N / group_size groups of completions of one prompt each -> (N,) advantages: each
    reward minus its group's mean, over its group's standard deviation (the sequel's 1e-4 keeps an all-equal
    group at 0: nothing to learn from it)."""
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)


def grpo_loss(logp, mask, advantages, n_tokens, ref_logp=None, kl_beta=0.0):
    """The policy-gradient loss of one chunk of completions, averaged over the n_tokens completion tokens of
    the whole step: -advantage * log p(token) for each completion token (mask (B, T)), plus kl_beta times the
    k3 estimate of KL(policy || reference) per token. logp, ref_logp (B, T), advantages (B,). Sampling and
    the update both use the current policy (one update per batch of samples), so the ratio of PPO's clipped
    objective is 1 and its gradient is this one."""
    loss = -(advantages[:, None] * logp * mask).sum()
    if kl_beta:
        delta = (ref_logp - logp) * mask
        loss = loss + kl_beta * ((delta.exp() - delta - 1) * mask).sum()
    return loss / n_tokens


def completion_batch(prompts, completions, pad_id, dev):
    """x, y (B, T) for the update: each row is its prompt then its completion, right-padded, so every token has
    the position and the context it had in generation (where the left padding was masked out and positions
    counted from each row's first token); y holds the completion's tokens, -100 for the prompt and the padding."""
    rows = [p + c for p, c in zip(prompts, completions)]
    x = torch.full((len(rows), max(map(len, rows)) - 1), pad_id, dtype=torch.long)
    y = torch.full_like(x, -100)
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        x[i, :len(row) - 1] = torch.tensor(row[:-1])
        y[i, len(prompt) - 1:len(row) - 1] = torch.tensor(row[len(prompt):])  # y[j] is token j + 1
    return x.to(dev), y.to(dev)


def rollouts(model, batch, prompts, end_id, tokenizer, dev, ctx, generator):
    """group_size sampled completions of each problem in batch (one generate call), and their rewards (N,):
    1 when the verifier finds the answer, 0 otherwise and for a completion that never ended."""
    rows = [ids for ids in prompts for _ in range(group_size)]
    completions = generate_batch(model, rows, end_id, dev, ctx, max_new_tokens, temperature, generator)
    answers = [entry['answer'] for entry in batch for _ in range(group_size)]
    rewards = [reward(c, answer, end_id, tokenizer, verifier) for c, answer in zip(completions, answers)]
    return rows, completions, torch.tensor(rewards)


def grpo_backward(model, reference, rows, completions, advantages, pad_id, dev, ctx, scaler):
    """The step's GRPO loss, gen_batch_size completions at a time (the gradients add up to the whole step's,
    without its (N, T, vocab) logits in memory at once): every chunk's is backpropagated but the last, which is
    returned for optimizer_step to backpropagate before it steps. Returns (that last loss, the step's loss)."""
    n_tokens, total = sum(map(len, completions)), 0.0
    starts = range(0, len(rows), gen_batch_size)
    for i in starts:
        x, y = completion_batch(rows[i:i + gen_batch_size], completions[i:i + gen_batch_size], pad_id, dev)
        with ctx:
            logp, mask = token_logprobs(model, x, y, temperature)
            ref_logp = None
            if kl_beta:
                with torch.no_grad():
                    if reference is None:
                        set_lora_enabled(model, False)  # LoRA: the model without its adapters is the reference
                    ref_logp = token_logprobs(reference or model, x, y, temperature)[0]
                    if reference is None:
                        set_lora_enabled(model, True)
            loss = grpo_loss(logp, mask, advantages[i:i + gen_batch_size].to(dev), n_tokens, ref_logp, kl_beta)
        total += loss.item()
        if i != starts[-1]:
            scaler.scale(loss).backward()
    return loss, total


@torch.no_grad()
def evaluate_problems(model, problems, prompts, end_id, tokenizer, dev, ctx, k=0):
    """Greedy accuracy and self-consistency@k (the sequel's chapter 4: the answer most of k samples at
    `temperature` give, a majority vote) on problems, gen_batch_size rows at a time, with progress."""
    extract, normalize = VERIFIERS[verifier]
    generator = torch.Generator(dev).manual_seed(seed)  # the same samples at every evaluation of the same model
    correct, voted = 0, 0
    for i in range(0, len(problems), gen_batch_size):
        batch, ids = problems[i:i + gen_batch_size], prompts[i:i + gen_batch_size]
        for entry, c in zip(batch, generate_batch(model, ids, end_id, dev, ctx, max_new_tokens)):
            correct += reward(c, entry['answer'], end_id, tokenizer, verifier)
        if k:  # k samples of each problem of the batch, in one call
            samples = generate_batch(model, [p for p in ids for _ in range(k)], end_id, dev, ctx, max_new_tokens,
                                     temperature, generator)
            for j, entry in enumerate(batch):
                answers = [extract(tokenizer.decode(c[:-1])) for c in samples[j * k:(j + 1) * k] if c[-1:] == [end_id]]
                votes = Counter(normalize(a) for a in answers if a is not None)
                voted += bool(votes) and votes.most_common(1)[0][0] == normalize(entry['answer'])
        print(f"\revaluating {i + len(batch)}/{len(problems)}", end='', file=sys.stderr, flush=True)
    print('\r' + ' ' * 30 + '\r', end='', file=sys.stderr)
    return {'greedy': correct / len(problems), **({f'sc@{k}': voted / len(problems)} if k else {})}


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
    save_text(Path(out_dir) / name, json.dumps(obj, indent=2))


def save_responses(model, test, tokenizer, dev, ctx):
    """The test entries with their model_response (ch07 7.7), also written to out_dir/test_responses.json."""
    for i in range(0, len(test), gen_batch_size):
        batch = test[i:i + gen_batch_size]
        for entry, response in zip(batch, respond_batch(model, batch, tokenizer, prompt_style, dev, ctx, max_new_tokens)):
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


def load_model(source=None):
    """(model on the CPU, its tokenizer, the padding id) of --init_from (or of source)."""
    source = source or init_from
    try:
        if source == 'scratch':
            tokenizer = get_tokenizer('gpt2')
            model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                                  vocab_size=tokenizer.vocab_size, dropout=dropout))
        else:
            model, info = load_pretrained(os.path.join(out_dir, 'ckpt.pt') if source == 'resume' else source,
                                          dtype=torch.float32, dropout=dropout)
            tokenizer = get_tokenizer(info['tokenizer'])
        # padding, and the first pad the target the model learns to stop with: end-of-text (alpaca, phi3),
        # or the chat format's end of a turn (<|eot_id|>, <|im_end|>)
        return model, tokenizer, response_end_id(tokenizer, prompt_style)
    except (OSError, ValueError) as e:
        die(e)


def load_grpo_model(dev):
    """(model (with LoRA if asked) on dev, the frozen reference of the KL term or None, tokenizer, the run's
    starting point, the checkpoint to resume or None). A resumed run loads its starting point again (the
    reference, and LoRA's frozen weights), then the trained weights from out_dir/ckpt.pt."""
    ckpt, start = None, init_from
    if init_from == 'resume':
        try:
            ckpt = load_checkpoint(out_dir)
        except (OSError, ValueError) as e:
            die(e)
        if ckpt.get('method') != 'grpo' or 'start' not in ckpt:
            die(f"{out_dir}/ckpt.pt is not a GRPO run's checkpoint; start one with --init_from=<a model>")
        if ckpt['config'].get('lora_rank') != lora_rank:
            die(f"--lora_rank={lora_rank} but the run in {out_dir} used {ckpt['config'].get('lora_rank')}; give the same")
        start = ckpt['start']
    model, tokenizer, _ = load_model(start)
    reference = None
    if kl_beta and lora_rank == 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False).to(dev)
    if lora_rank > 0:
        apply_lora(model, lora_rank, lora_alpha)  # only the adapters train; without them it is the reference
    if ckpt is not None:
        model.load_state_dict(ckpt['lora'] if lora_rank else ckpt['model'], strict=not lora_rank)
    return model.to(dev), reference, tokenizer, start, ckpt


def save_grpo_checkpoint(model, optimizer, generator, tokenizer, step, start, config, metrics):
    """out_dir/ckpt.pt: the merged weights every script loads, and what --init_from=resume needs to continue
    exactly (the LoRA adapters, the optimizer, both random number generators, the step, the starting point)."""
    save_checkpoint({'model': merged_state_dict(model), 'model_args': vars(model.config).copy(),
                     'tokenizer': tokenizer.spec, 'prompt_style': None, 'method': 'grpo', 'iter_num': step,
                     'config': config, 'start': start, 'metrics': metrics, 'optimizer': optimizer.state_dict(),
                     'lora': {k: v for k, v in model.state_dict().items() if '.lora_' in k} if lora_rank else None,
                     'rng': {'torch': torch.get_rng_state(), 'sampling': generator.get_state()}},
                    Path(out_dir) / 'ckpt.pt')


def grpo(dev, device_type, amp_dtype, ctx, config):
    """Reinforcement learning with verifiable rewards (the sequel's chapter 6): each step samples group_size
    completions of batch_size problems, rewards those the verifier finds right, and makes the better-than-their-
    group ones more likely. Evaluates before training and every eval_interval steps, saving a checkpoint each time."""
    if verifier not in VERIFIERS or problem_prompt not in ('auto', 'sequel', 'plain') or group_size < 2:
        die(f"--verifier={verifier} --problem_prompt={problem_prompt} --group_size={group_size}: use math or exact, "
            "auto, sequel or plain, and at least 2 completions a problem (advantages compare them)")
    try:
        train, test = load_problems(data or 'math_train', data_dir), load_problems(test_data, data_dir)
    except (OSError, ValueError) as e:
        die(e)
    test = test[:eval_limit or None]
    model, reference, tokenizer, start, ckpt = load_grpo_model(dev)
    kind = problem_prompt if problem_prompt != 'auto' else 'plain' if own_model(start) else 'sequel'
    room, end_id = model.config.block_size - max_new_tokens, tokenizer.eot_id  # a completion ends with end-of-text
    if room < 1:
        die(f"--max_new_tokens={max_new_tokens} leaves no room for a prompt in block_size {model.config.block_size}")
    encode = lambda entries: [encode_problem(e, tokenizer, kind, room) for e in entries]  # noqa: E731
    test_prompts = encode(test)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=grpo_learning_rate, weight_decay=weight_decay,
                                  fused=device_type in FUSED_ADAMW_DEVICES)
    scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == 'float16')
    generator = torch.Generator(dev).manual_seed(seed)  # the rollouts' samples
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()  # problem order
    steps, step = max_iters or len(train) // batch_size, 0
    fmt = lambda m: ', '.join(f"{k} {v:.1%}" for k, v in m.items())  # noqa: E731
    print(f"{len(train):,} problems, {len(test)} held out; {start} ({kind} prompts, {verifier} verifier): "
          f"{model.get_num_params():,} parameters, {sum(p.numel() for p in params):,} trainable; "
          f"{steps} steps of {batch_size} problems x {group_size} completions")
    if ckpt is None:
        metrics = {'before': evaluate_problems(model, test, test_prompts, end_id, tokenizer, dev, ctx, sc_k)}
        print(f"before training: held-out {fmt(metrics['before'])}")
        if eval_only:
            return
    else:
        optimizer.load_state_dict(ckpt['optimizer'])
        torch.set_rng_state(ckpt['rng']['torch'])
        generator.set_state(ckpt['rng']['sampling'])
        step, metrics = ckpt['iter_num'], ckpt['metrics']
        print(f"resumed at step {step}")
    steps_done = 0
    while step < steps:
        t = time.time()
        batch = [train[order[(step * batch_size + j) % len(train)]] for j in range(batch_size)]
        rows, completions, rewards = rollouts(model, batch, encode(batch), end_id, tokenizer, dev, ctx, generator)
        last, loss = grpo_backward(model, reference, rows, completions, group_advantages(rewards, group_size),
                                   end_id, dev, ctx, scaler)
        optimizer_step(last, optimizer, scaler, params, grad_clip)
        step, steps_done = step + 1, steps_done + 1
        metrics['train_seconds'] = metrics.get('train_seconds', 0) + time.time() - t  # evaluations left out
        ended = sum(c[-1:] == [end_id] for c in completions) / len(completions)
        tokens = sum(map(len, completions))
        print(f"step {step}/{steps}: reward {rewards.mean():.3f} (accuracy {rewards.mean():.1%}, "
              f"{(rewards.view(-1, group_size).amax(1) > 0).float().mean():.0%} of problems solved once, "
              f"{ended:.0%} ended) | loss {loss:.4f} | {tokens / (time.time() - t):,.0f} tokens/s, "
              f"{(time.time() - t) * 1000:.0f} ms/step")
        if step % eval_interval == 0 or step == steps:
            metrics[f'step {step}'] = evaluate_problems(model, test, test_prompts, end_id, tokenizer, dev, ctx, sc_k)
            print(f"step {step}: held-out {fmt(metrics[f'step {step}'])}")
            save_grpo_checkpoint(model, optimizer, generator, tokenizer, step, start, config, metrics)
            write_json('metrics.json', metrics)
    if steps_done:
        final = metrics[f'step {step}']
        print(f"held-out accuracy {metrics['before']['greedy']:.1%} -> {final['greedy']:.1%} "
              f"({step} steps, {metrics['train_seconds'] / 60:.1f} min of training; saved {out_dir}/ckpt.pt)")


def main():
    config = {k: globals()[k] for k in config_keys(globals())}  # what this run was asked to do, for the checkpoint
    dev, device_type, amp_dtype, ctx = setup(device, dtype, seed)
    if prompt_style not in PROMPT_STYLES:
        die(f"--prompt_style={prompt_style}: use {', '.join(PROMPT_STYLES)}")
    if judge not in ('ollama', 'openai', 'none'):
        die(f"--judge={judge}: use ollama, openai or none")
    if method not in (*DATA, 'grpo'):
        die(f"--method={method}: use sft, dpo or grpo")
    if gen_batch_size < 1:
        die(f"--gen_batch_size={gen_batch_size}: give at least 1")
    if method == 'grpo':
        return grpo(dev, device_type, amp_dtype, ctx, config)
    talk_dtype = quantized_dtype(quantize, device_type, amp_dtype)
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
    os.makedirs(out_dir, exist_ok=True)
    save_checkpoint({'model': merged_state_dict(model), 'model_args': vars(model.config).copy(),
                     'tokenizer': tokenizer.spec, 'prompt_style': prompt_style, 'method': method, 'iter_num': step,
                     'config': config}, Path(out_dir) / 'ckpt.pt')
    del optimizer, params  # the optimizer's state (two float32 copies of what trained) and the DPO reference are
    reference = None  # no longer needed: the test responses need only the model
    if quantize != 'none':  # as sample.py --quantize talks with the checkpoint just saved: merged, cast, quantized
        QUANTIZERS[quantize](merge_lora(model).to(dtype=getattr(torch, talk_dtype)))
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
