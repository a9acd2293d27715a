"""
Reinforcement learning with verifiable rewards: a verifier, self-consistency and GRPO (the sequel's chapters 3,
4 and 6, "Build a Reasoning Model (From Scratch)"), on any model the other scripts take.
    python finetune_grpo.py                                # Qwen3-0.6B-Base on MATH, MATH-500 held out (a GPU)
    python finetune_grpo.py config/arithmetic_grpo.py      # the from-scratch demonstration (README), on a CPU
    python finetune_grpo.py --init_from=out-grpo --eval_only=True --sc_k=8   # greedy and self-consistency only
"""
import copy
import re
import sys
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import torch

from configurator import configure, run_config, setup, die, optimizer_step
from model import FUSED_ADAMW_DEVICES, apply_lora, generate_batch, lora_disabled, pad_rows, token_logprobs
from weights import load_checkpoint, load_pretrained, save_checkpoint, save_json
from tokenizer import get_tokenizer
from prepare_data import load_problems

init_from = 'qwen3-0.6b-base'  # a GPT-2 size, a hub id, resume (out_dir/ckpt.pt), a ckpt.pt or an HF folder
out_dir = 'out-grpo'
data = 'math_train'  # {problem, answer} to train on: a JSON list / JSONL file, or math_train (the sequel's 12,000)
test_data = 'math500'  # held-out {problem, answer}, evaluated before and at each eval: a file, math500, math500_jsonl
data_dir = 'data/grpo'  # where math_train / math500 are downloaded to
verifier = 'math'  # math (the last \boxed{}, else the final number, normalised) or exact (the last line)
problem_prompt = 'auto'  # sequel (its MATH prompt), plain (the problem as pretraining text), auto (plain for ours)
lora_rank = 0  # > 0: train LoRA adapters of this rank instead of all weights (merged at save)
lora_alpha = 16
batch_size = 1  # problems per step
group_size = 8  # completions sampled per problem
max_new_tokens = 512  # a completion's length; one cut off earns nothing
temperature = 0.8  # of the rollouts, of the update's log-probs and of self-consistency's samples
kl_beta = 0.0  # weight of a KL penalty to the starting model (the sequel found none best)
learning_rate = 1e-5  # 10-50x below pretraining's (a GRPO step moves weights further than its lr suggests)
weight_decay = 0.1
grad_clip = 0.0
max_iters = 50  # steps (0 = one pass over data)
eval_interval = 50  # evaluate on test_data and save out_dir/ckpt.pt every this many steps
eval_limit = 0  # held-out problems evaluated (0 = all)
sc_k = 8  # self-consistency@k (a majority vote over k samples) at each evaluation; 0 = greedy accuracy only
eval_only = False  # evaluate --init_from on test_data (greedy and self-consistency) and exit
gen_batch_size = 32  # rows generated (and scored in the update) at once
seed = 123
device = 'auto'
dtype = 'auto'


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


NUMBER = r'-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+'  # 1,500 is one number; 1,5000 two
# a number, or several joined into a list (7 or 8; 3, 4), with the bracket that makes one a tuple's: (1,500);
# never a LaTeX argument or power (\frac{1}{2}, x^2) nor the end of a word (x2)
ANSWER = re.compile(rf'(?<![\w{{^_])[(\[]?(?:{NUMBER})(?:\s*(?:,|\bor\b|\band\b)\s*(?:{NUMBER}))*[)\]]?')
STATED = re.compile(rf'answer(?:\s+is\s*:?|\s*:)\s*\$?({ANSWER.pattern})', re.IGNORECASE)
# a \frac's argument, one token as LaTeX reads it: a {group} (itself holding {groups}: \sqrt{3}), \pi, or a character
FRAC = re.compile(r'\\frac' + 2 * r'(\{(?:[^{}]|\{[^{}]*\})*\}|\\[a-zA-Z]+|\w)')


def extract_math(completion):
    """The final answer of a math completion: the last \\boxed{}, else the number after the last "answer is" or
    "answer:", else the last number; None for none, or for a number that is one of several (7 or 8; (3, 4))."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    found = STATED.findall(completion) or ANSWER.findall(completion)
    return found[-1] if found and len(re.findall(NUMBER, found[-1])) == 1 else None


def unwrap_frac(s):
    """\\frac{a}{b} -> a/b, the parts in parentheses when they are more than one term ((a+1)/b), the whole when a
    letter or digit follows it (\\frac123 is \\frac{1}{2}3, never 1/23) or it ends a mixed number (6\\frac14)."""
    while (m := FRAC.search(s)):
        a, b = (unwrap_frac(t[1:-1] if t[0] == '{' else t) for t in m.groups())
        a, b = (f"({t})" if re.search(r'[+\-*/ ]', t.lstrip('-')) else t for t in (a, b))
        whole = s[m.end():m.end() + 1].isalnum() or s[:m.start()][-1:].isdigit() and a.isdigit()
        s = s[:m.start()] + (f"({a}/{b})" if whole else f"{a}/{b}") + s[m.end():]
    return s


def normalize_math(answer):
    """A math answer in one canonical spelling, so that equal answers compare equal as strings: no spaces, $,
    \\left/\\right, units in \\text{}, degrees or percent signs; \\dfrac and \\tfrac are \\frac, and \\frac{a}{b}
    is a/b; a bare number's thousands commas and a trailing .0 go; a plain number, ratio or mixed number becomes
    its reduced fraction (0.5, 1/2 and \\frac{2}{4} all read 1/2); several answers (5, 7; 5 \\text{ or } 7) are a
    sorted list, equal only to the same set. No computer algebra: 2x+2 and 2(x+1) stay different."""
    s = answer.strip()
    for old, new in (('\\left', ''), ('\\right', ''), ('\\!', ''), ('\\,', ''), ('\\;', ''), ('\\ ', ''),
                     ('\\dfrac', '\\frac'), ('\\tfrac', '\\frac'), ('\\$', ''), ('$', ''), ('\\%', ''), ('%', ''),
                     ('^{\\circ}', ''), ('^\\circ', ''), ('\\displaystyle', ''), ('{,}', ',')):
        s = s.replace(old, new)
    text = r'\\(?:text|textbf|mbox|mathrm)\{'  # a unit, a word, a label
    s = re.sub(text + r'\s*(?:or|and)\s*\}|\s(?:or|and)\s', ', ', s)  # 5 \text{ or } 7: several answers
    units = text + r'[^{}]*\}(?:\^\{?\d\}?)?'  # with its power: 24\text{ cm}^2
    s = re.sub(units, '', s) if re.sub(units, '', s).strip() else re.sub(text + r'([^{}]*)\}', r'\1', s)
    s = re.sub(r'^\s*[a-zA-Z]\s*=(?!=)', '', s).strip()  # x=5 -> 5
    if re.fullmatch(r'-?\d{1,3}(,\d{3})+(\.\d+)?', s):  # a number's thousands commas, never a list's: 1, 500; (1,500)
        s = s.replace(',', '')
    if ',' in s and not re.search(r'[()\[\]]|\\\{', s):  # several answers, in no order (a tuple or set keeps its own)
        return ','.join(sorted(normalize_math(t) for t in s.split(',')))
    s = re.sub(r'\s+', '', s)
    s = re.sub(r'\\sqrt(\w)', r'\\sqrt{\1}', s)
    s = re.sub(r'^\(([A-Za-z])\)$', r'\1', unwrap_frac(s).rstrip('.'))  # a choice: (C) is C
    s = re.sub(r'(\d)\.0+(?!\d)', r'\1', s)
    try:
        if (m := re.fullmatch(r'(-?)(\d+)\((\d+/\d+)\)', s)):  # a mixed number: 6\frac14 is 25/4
            s = str((int(m[2]) + Fraction(m[3])) * (-1 if m[1] else 1))
        elif re.fullmatch(r'\(?-?(\d+\.?\d*|\.\d+)\)?(/\(?\d+\)?)?', s):
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
    x = pad_rows([(p + c)[:-1] for p, c in zip(prompts, completions)], pad_id)
    y = pad_rows([[-100] * (len(p) - 1) + c for p, c in zip(prompts, completions)], -100)  # y[j] is token j + 1
    return x.to(dev), y.to(dev)


def rollouts(model, batch, prompts, end_id, tokenizer, ctx, generator):
    """group_size sampled completions of each problem in batch (one generate call), and their rewards (N,):
    1 when the verifier finds the answer, 0 otherwise and for a completion that never ended."""
    rows = [ids for ids in prompts for _ in range(group_size)]
    with ctx:
        completions = generate_batch(model, rows, end_id, max_new_tokens, temperature, generator)
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
            if kl_beta:  # the frozen copy, or (LoRA) the model without its adapters
                with torch.no_grad(), lora_disabled(model):
                    ref_logp = token_logprobs(reference or model, x, y, temperature)[0]
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
        with ctx:
            greedy = generate_batch(model, ids, end_id, max_new_tokens)
            samples = generate_batch(model, [p for p in ids for _ in range(k)], end_id, max_new_tokens, temperature,
                                     generator) if k else []  # k samples of each problem of the batch, in one call
        for entry, c in zip(batch, greedy):
            correct += reward(c, entry['answer'], end_id, tokenizer, verifier)
        if k:
            for j, entry in enumerate(batch):
                answers = [extract(tokenizer.decode(c[:-1])) for c in samples[j * k:(j + 1) * k] if c[-1:] == [end_id]]
                votes = Counter(normalize(a) for a in answers if a is not None)
                voted += bool(votes) and votes.most_common(1)[0][0] == normalize(entry['answer'])
        print(f"\revaluating {i + len(batch)}/{len(problems)}", end='', file=sys.stderr, flush=True)
    print('\r' + ' ' * 30 + '\r', end='', file=sys.stderr)
    return {'greedy': correct / len(problems), **({f'sc@{k}': voted / len(problems)} if k else {})}


# -------------------------------------------------------------------- the run

def load_grpo_model(dev):
    """(model (with LoRA if asked) on dev, the frozen reference of the KL term or None, tokenizer, the checkpoint
    to resume or None, {the run's starting point, its kind of prompt}). A resumed run loads its starting point
    again (the reference, and LoRA's frozen weights), then the trained weights from out_dir/ckpt.pt."""
    ckpt, start = None, init_from
    if init_from == 'resume':
        try:
            ckpt = load_checkpoint(out_dir)
        except (OSError, ValueError) as e:
            die(e)
        if ckpt.get('method') != 'grpo' or 'start' not in ckpt:
            die(f"{out_dir}/ckpt.pt is not a GRPO run's checkpoint; start one with --init_from=<a model>")
        if ckpt['config'].get('lora_rank') != lora_rank:
            die(f"--lora_rank={lora_rank} but the run in {out_dir} used {ckpt['config'].get('lora_rank')}; "
                "give the same")
        start = ckpt['start']
    try:
        model, info = load_pretrained(start, dtype=torch.float32)
        tokenizer = get_tokenizer(info['tokenizer'])
    except (OSError, ValueError) as e:
        die(e)
    reference = None  # the KL term's: a frozen copy, or (LoRA) the model with its adapters off
    if kl_beta and lora_rank == 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False).to(dev)
    if lora_rank > 0:
        apply_lora(model, lora_rank, lora_alpha)  # only the adapters train; without them it is the reference
    if ckpt is not None:
        model.load_state_dict(ckpt['lora'] if lora_rank else ckpt['model'], strict=not lora_rank)
    saved = (ckpt or info['checkpoint'] or {}).get('problem_prompt')  # a GRPO run's model goes on with its prompts
    ours = info['checkpoint'] is not None  # a model of ours (train.py's or this script's) reads plain text
    kind = problem_prompt if problem_prompt != 'auto' else saved or ('plain' if ours else 'sequel')
    return model.to(dev), reference, tokenizer, ckpt, {'start': start, 'problem_prompt': kind}


def save_grpo_checkpoint(model, optimizer, generator, tokenizer, step, config, run, metrics):
    """out_dir/ckpt.pt: the merged weights every script loads, and what --init_from=resume needs to continue
    exactly (the LoRA adapters, the optimizer, both random number generators, the step, the run's start)."""
    save_checkpoint(Path(out_dir) / 'ckpt.pt', model, tokenizer.spec, config, prompt_style=None, method='grpo',
                    iter_num=step, **run, metrics=metrics, optimizer=optimizer.state_dict(),
                    lora={k: v for k, v in model.state_dict().items() if '.lora_' in k} if lora_rank else None,
                    rng={'torch': torch.get_rng_state(), 'sampling': generator.get_state()})


def main():
    """Reinforcement learning with verifiable rewards (the sequel's chapter 6): each step samples group_size
    completions of batch_size problems, rewards those the verifier finds right, and makes the better-than-their-
    group ones more likely. Evaluates before training and every eval_interval steps, saving a checkpoint each time."""
    config = run_config(globals())  # what this run was asked to do, for the checkpoint
    dev, device_type, amp_dtype, ctx = setup(device, dtype, seed)
    if gen_batch_size < 1:
        die(f"--gen_batch_size={gen_batch_size}: give at least 1")
    if verifier not in VERIFIERS or problem_prompt not in ('auto', 'sequel', 'plain') or group_size < 2:
        die(f"--verifier={verifier} --problem_prompt={problem_prompt} --group_size={group_size}: use math or exact, "
            "auto, sequel or plain, and at least 2 completions a problem (advantages compare them)")
    try:
        train = [] if eval_only else load_problems(data, data_dir)
        test = load_problems(test_data, data_dir)
    except (OSError, ValueError) as e:
        die(e)
    test = test[:eval_limit or None]
    model, reference, tokenizer, ckpt, run = load_grpo_model(dev)
    start, kind = run['start'], run['problem_prompt']
    room, end_id = model.config.block_size - max_new_tokens, tokenizer.eot_id  # a completion ends with end-of-text
    if room < 1:
        die(f"--max_new_tokens={max_new_tokens} leaves no room for a prompt in block_size {model.config.block_size}")
    encode = lambda entries: [encode_problem(e, tokenizer, kind, room) for e in entries]  # noqa: E731
    test_prompts = encode(test)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay,
                                  fused=device_type in FUSED_ADAMW_DEVICES)
    scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == 'float16')
    generator = torch.Generator(dev).manual_seed(seed)  # the rollouts' samples
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()  # problem order
    steps, step = max_iters or len(train) // batch_size, 0
    fmt = lambda m: ', '.join(f"{k} {v:.1%}" for k, v in m.items())  # noqa: E731
    print(f"{len(train):,} problems, {len(test)} held out; {start} ({kind} prompts, {verifier} verifier): "
          f"{model.get_num_params():,} parameters, {sum(p.numel() for p in params):,} trainable"
          + ('' if eval_only else f"; {steps} steps of {batch_size} problems x {group_size} completions"))
    if ckpt is None or eval_only:
        metrics = {'before': evaluate_problems(model, test, test_prompts, end_id, tokenizer, dev, ctx, sc_k)}
        print(f"{'' if eval_only else 'before training: '}held-out {fmt(metrics['before'])}")
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
        rows, completions, rewards = rollouts(model, batch, encode(batch), end_id, tokenizer, ctx, generator)
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
            save_grpo_checkpoint(model, optimizer, generator, tokenizer, step, config, run, metrics)
            save_json(Path(out_dir) / 'metrics.json', metrics)
    if steps_done:
        final = metrics[f'step {step}']
        print(f"held-out accuracy {metrics['before']['greedy']:.1%} -> {final['greedy']:.1%} "
              f"({step} steps, {metrics['train_seconds'] / 60:.1f} min of training; saved {out_dir}/ckpt.pt)")


if __name__ == '__main__':
    configure(globals())
    main()
