"""
How good is a model: HellaSwag, ARC, PIQA, Winogrande, MMLU and GSM8K, scored as lm-evaluation-harness scores them
(its task definitions: the same prompts, acc and acc_norm), so that the figures sit beside published ones.
    python eval.py                                           # out/ckpt.pt on the multiple-choice tasks -> out/eval.json
    python eval.py --init_from=gpt2 --tasks=hellaswag --limit=500   # a quick look
    python eval.py --init_from=qwen3-0.6b --tasks=mmlu,gsm8k --quantize=int8
    python eval.py --data_dir=/sets                          # offline: /sets/hellaswag/hellaswag_val.jsonl, ...
Multiple choice: the log-likelihood of each choice (" " + choice) after the task's context; acc takes the highest
sum, acc_norm the highest per character. GSM8K: greedy answers, checked by finetune_grpo.py's verifier.
"""
import csv
import io
import json
import re
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import torch

from configurator import configure, setup, die
from model import generate_batch, pad_rows
from quantize import cast_and_quantize, talk_dtype
from weights import atomic_write, download, load_pretrained, save_json
from tokenizer import PROMPT_STYLES, format_prompt, get_tokenizer, response_end_id
from finetune_grpo import is_correct

init_from = 'resume'  # resume (out_dir/ckpt.pt), a ckpt.pt or its folder, gpt2..., qwen3-0.6b, a hub id, a HF folder
out_dir = 'out'
tasks = 'hellaswag,arc_easy,arc_challenge,piqa,winogrande,mmlu'  # comma-separated, of TASKS (gsm8k generates: slow)
limit = None  # score only each task's first N items (MMLU: each subject's, as lm-eval's --limit); None = all
data_dir = 'data'  # each set is read from data_dir/<task>/ under its source's file names; what is missing is downloaded
out = ''  # the results as JSON {task: {metric: value, ..., "n": items}}; '' = eval.json beside a checkpoint of ours
batch_size = 4  # items whose choices go through the model in one batch (more on a GPU); 0 = each choice alone
gen_batch_size = 16  # GSM8K: problems answered at once
max_new_tokens = 256  # GSM8K: the longest answer
chat_style = 'auto'  # GSM8K: auto (a fine-tuned checkpoint's own template, else 8-shot), fewshot, or a chat style
quantize = 'none'  # int8 | int4 (CPU) weights (quantize.py): faster on a CPU
device = 'auto'
dtype = 'auto'  # bfloat16 where the hardware has it (GPUs, recent CPUs)
seed = 1337

TASKS = {  # name: (shots, metrics), as lm-eval's task of that name reports them (acc_norm_llmc: llm.c's, see below)
    'hellaswag': (0, ('acc', 'acc_norm', 'acc_norm_llmc')),
    'arc_easy': (0, ('acc', 'acc_norm')),
    'arc_challenge': (0, ('acc', 'acc_norm')),
    'piqa': (0, ('acc', 'acc_norm')),
    'winogrande': (0, ('acc',)),
    'mmlu': (5, ('acc',)),
    'gsm8k': (8, ('exact_match',)),
}

# -------------------------------------------------------------------- data: each set's public plain files

HELLASWAG_URL = 'https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl'
ARC_ZIP = 'https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip'  # 680 MB, nearly all a corpus
PIQA_URL = 'https://yonatanbisk.com/piqa/data/'
WINOGRANDE_ZIP = 'https://storage.googleapis.com/ai2-mosaic/public/winogrande/winogrande_1.1.zip'
MMLU_TAR = 'https://people.eecs.berkeley.edu/~hendrycks/data.tar'
GSM8K_URL = ('https://raw.githubusercontent.com/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/'
             'grade_school_math/data/')
SOURCES = {  # task: {file it reads under data_dir/<task>/: (url, sha256 of what the url gives or None, archive member)}
    'hellaswag': {'hellaswag_val.jsonl': (HELLASWAG_URL, None, None)},
    'arc_easy': {'ARC-Easy-Test.jsonl': (ARC_ZIP, None, 'ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-Test.jsonl')},
    'arc_challenge': {'ARC-Challenge-Test.jsonl':
                      (ARC_ZIP, None, 'ARC-V1-Feb2018-2/ARC-Challenge/ARC-Challenge-Test.jsonl')},
    'piqa': {'valid.jsonl': (PIQA_URL + 'valid.jsonl', None, None),
             'valid-labels.lst': (PIQA_URL + 'valid-labels.lst', None, None)},
    'winogrande': {'dev.jsonl': (WINOGRANDE_ZIP, '3619ab104d8be2977b25c90ff420cb42d491707dcc75362a1e5d22bc082b7318',
                                 'winogrande_1.1/dev.jsonl')},
    'mmlu': {d: (MMLU_TAR, 'bec563ba4bac1d6aaf04141cd7d1605d7a5ca833e38f994051e818489592989b', d + '/')
             for d in ('data/dev', 'data/test')},  # a folder: every file in it (one CSV per subject)
    'gsm8k': {'test.jsonl': (GSM8K_URL + 'test.jsonl',
                             '3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14', None),
              'train.jsonl': (GSM8K_URL + 'train.jsonl', None, None)},  # only its first 8 problems: the shots
}


def fetch(task, folder):
    """folder (data_dir/<task>/) holding every file the task reads: a missing one is downloaded (an archive into
    data_dir, then all that any task reads from it unpacked into data_dir/<task>/, and the archive deleted)."""
    folder = Path(folder)
    for name, (url, sha256, member) in SOURCES[task].items():
        if (folder / name).exists():
            continue
        if member is None:
            download(url, folder / name, sha256, desc=f"{task}/{name}")
        else:
            archive = download(url, folder.parent / url.rsplit('/', 1)[1], sha256)
            unpack(archive, url, folder.parent)
            archive.unlink()
    return folder


def unpack(archive, url, data_dir):
    """Every file the tasks read from this archive, written into data_dir/<task>/ (each atomically)."""
    wanted = {member: Path(data_dir) / task / name for task, files in SOURCES.items()
              for name, (u, _, member) in files.items() if u == url}
    try:
        if archive.suffix == '.zip':
            with zipfile.ZipFile(archive) as z:
                files = [(info.filename, lambda info=info: z.read(info)) for info in z.infolist()]
                write_members(files, wanted)
        else:
            with tarfile.open(archive) as t:
                files = [(m.name, lambda m=m: t.extractfile(m).read()) for m in t.getmembers() if m.isfile()]
                write_members(files, wanted)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{archive} is not a readable archive ({e}); delete it to download it again") from None


def write_members(files, wanted):
    """files: (name, read()) of an archive; wanted: {member or folder/: path}. A folder's files keep their names."""
    found = set()
    for name, read in files:
        for member, path in wanted.items():
            if name == member or member.endswith('/') and name.startswith(member) and '/' not in name[len(member):]:
                target = path / name[len(member):] if member.endswith('/') else path
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(target) as tmp:
                    tmp.write_bytes(read())
                found.add(member)
    if set(wanted) - found:
        raise OSError(f"it lacks {sorted(set(wanted) - found)[0]}")


def read_jsonl(path):
    rows = []
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"line {n} is not JSON ({e.msg})") from None
    return rows


# -------------------------------------------------------------------- each task's items, in lm-eval's formats
# An item: its choices as (context, continuation) texts, each choice's text (acc_norm divides by its length in
# characters) and the right choice's index. lm-eval joins context and continuation with " " (target_delimiter).

def choice_item(context, choices, label):
    return {'requests': [(context, ' ' + c) for c in choices], 'choices': choices, 'label': label}


def hellaswag_preprocess(text):
    """lm-eval's HellaSwag text cleaning: WikiHow's [title] becomes a sentence break, other [tags] go."""
    text = text.strip().replace(' [title]', '. ')
    return re.sub(r'\[.*?\]', '', text).replace('  ', ' ')


def hellaswag_items(folder):
    items = []
    for r in read_jsonl(folder / 'hellaswag_val.jsonl'):
        context = hellaswag_preprocess(r['activity_label'] + ': ' + r['ctx_a'] + ' ' + r['ctx_b'].capitalize())
        item = choice_item(context, [hellaswag_preprocess(e) for e in r['endings']], int(r['label']))
        item['llmc'] = (r['ctx'], r['endings'])  # llm.c's scoring reads the raw context and endings
        items.append(item)
    return items


def arc_items(folder, name):
    items = []
    for r in read_jsonl(folder / name):
        labels = [c['label'] for c in r['question']['choices']]  # A-E, or 1-5 for a few
        items.append(choice_item(f"Question: {r['question']['stem']}\nAnswer:",
                                 [c['text'] for c in r['question']['choices']], labels.index(r['answerKey'])))
    return items


def piqa_items(folder):
    rows = read_jsonl(folder / 'valid.jsonl')
    labels = (folder / 'valid-labels.lst').read_text(encoding='utf-8').split()
    if len(labels) != len(rows):
        raise ValueError(f"valid-labels.lst has {len(labels)} labels for {len(rows)} problems")
    return [choice_item(f"Question: {r['goal']}\nAnswer:", [r['sol1'], r['sol2']], int(label))
            for r, label in zip(rows, labels)]


def winogrande_items(folder):
    """Partial scoring (Trinh & Le): each option put in the blank is a context, and the sentence's rest after the
    blank, the same for both, is what is scored."""
    items = []
    for r in read_jsonl(folder / 'dev.jsonl'):
        blank = r['sentence'].index('_')
        rest = ' ' + r['sentence'][blank + 1:].strip()
        options = [r['option1'], r['option2']]
        items.append({'requests': [(r['sentence'][:blank] + o, rest) for o in options], 'choices': options,
                      'label': {'1': 0, '2': 1}[r['answer']]})
    return items


def read_mmlu_csv(path):
    """(question, [A, B, C, D], answer letter) rows of one subject's file."""
    rows = list(csv.reader(io.StringIO(path.read_text(encoding='utf-8'))))
    bad = next((n for n, r in enumerate(rows, 1) if len(r) != 6 or r[5] not in ('A', 'B', 'C', 'D')), None)
    if bad:
        raise ValueError(f"{path.name} row {bad} is not question, A, B, C, D, answer letter")
    return [(r[0], r[1:5], r[5]) for r in rows]


def mmlu_question(question, options):
    return question.strip() + ''.join(f"\n{letter}. {o}" for letter, o in zip('ABCD', options)) + '\nAnswer:'


def mmlu_items(folder):
    """Each subject's test questions after its header and its 5 dev questions answered (lm-eval's mmlu at
    num_fewshot=5); the choices are the letters."""
    items = []
    tests = sorted((folder / 'data' / 'test').glob('*_test.csv'))
    if not tests:
        raise ValueError("data/test holds no *_test.csv file")
    for path in tests:
        subject = path.name.removesuffix('_test.csv')
        shots = read_mmlu_csv(folder / 'data' / 'dev' / f'{subject}_dev.csv')[:TASKS['mmlu'][0]]
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        header += ''.join(f"{mmlu_question(q, o)} {a}\n\n" for q, o, a in shots)
        for q, o, a in read_mmlu_csv(path):
            items.append({**choice_item(header + mmlu_question(q, o), list('ABCD'), 'ABCD'.index(a)),
                          'subject': subject})
    return items


def gsm8k_items(folder):
    shots = [(r['question'], r['answer']) for r in read_jsonl(folder / 'train.jsonl')[:TASKS['gsm8k'][0]]]
    fewshot = ''.join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots)
    return [{'question': r['question'], 'answer': r['answer'].split('####')[-1].strip(), 'fewshot': fewshot}
            for r in read_jsonl(folder / 'test.jsonl')]


READERS = {'hellaswag': hellaswag_items, 'arc_easy': lambda f: arc_items(f, 'ARC-Easy-Test.jsonl'),
           'arc_challenge': lambda f: arc_items(f, 'ARC-Challenge-Test.jsonl'), 'piqa': piqa_items,
           'winogrande': winogrande_items, 'mmlu': mmlu_items, 'gsm8k': gsm8k_items}


def read_items(task, folder, limit=None):
    """The task's items from folder (data_dir/<task>/; downloaded first if missing), the first `limit` of them (of
    each MMLU subject's)."""
    folder = fetch(task, folder)
    try:
        items = READERS[task](folder)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{folder} does not hold {task}'s files as its source has them ({type(e).__name__}: {e}); "
                         "a file may be cut short: delete it to download it again") from None
    if not items:
        raise ValueError(f"{folder} holds no {task} items")
    if limit is not None:  # each subject's first `limit` (one subject but in MMLU)
        kept = {}
        items = [it for it in items if kept.setdefault(it.get('subject'), []).append(it) or
                 len(kept[it.get('subject')]) <= limit]
    return items


def gsm8k_prompt(item, style=None):
    """lm-eval's gsm8k prompt at 8 shots for a base model; for a chat model, one user turn asking for the answer."""
    if style is None:
        return item['fewshot'] + f"Question: {item['question']}\nAnswer:"
    instruction = (f"Solve this math problem step by step.\n\n{item['question']}\n\n"
                   "End your response with \"The final answer is N\", N being the number.")
    return format_prompt({'instruction': instruction, 'input': ''}, style)


# -------------------------------------------------------------------- scoring

def encode_pair(tokenizer, context, continuation):
    """(context ids, continuation ids) as lm-eval makes them: the whole text encoded, and the continuation the
    tokens past the context's own; a context's trailing spaces move to the continuation; an empty context is the
    end-of-text token."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    whole, context_ids = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def llmc_pairs(context, endings, tokenizer):
    """HellaSwag as llm.c (and train.py's history) scores it: the raw context, each ending encoded on its own."""
    context_ids = tokenizer.encode(context)
    return [(context_ids, tokenizer.encode(' ' + e)) for e in endings]


def common_length(rows):
    """How many first tokens all rows share."""
    return next((j for j, tokens in enumerate(zip(*rows)) if len(set(tokens)) > 1), min(map(len, rows)))


def continuation_states(model, rows, starts, sizes, dev, share_context=True):
    """(final states (B, L, n_embd), targets (B, L), -100 where nothing is scored) of token rows scored from their
    starts on; sizes: how many consecutive rows are one item's choices. Each item's first tokens that its choices
    share go through the model once, into a KV cache (items left-padded in it, as generate_batch pads prompts) that
    the choices continue from, each the rest of its row, right-padded, in one batch. Where the rows share nothing
    or would not fit the context so, or share_context is off, each row whole, right-padded (padding follows a row's
    tokens, so causal attention never lets the row see it): one forward pass whatever the data, as FSDP's processes
    need (each gathers the weights in every forward; a rank-dependent number of passes would hang them)."""
    T, dev = model.config.block_size, torch.device(dev)
    firsts = [sum(sizes[:k]) for k in range(len(sizes))]  # each item's first row
    shared = [min(common_length(rows[f:f + n]), *(s - 1 for s in starts[f:f + n])) for f, n in zip(firsts, sizes)]
    own = [p for p, n in zip(shared, sizes) for _ in range(n)]  # each row's shared start
    length = max(shared) + max(len(r) - 1 - p for r, p in zip(rows, own))  # the cache's slots: starts, then rests
    cache = None
    if not share_context or min(shared) < 1 or length > T or min(sizes) < 2:  # (a row alone gains nothing)
        own = [0] * len(rows)
    else:
        cache = model.new_kv_cache(len(sizes), length, dev, torch.tensor([max(shared) - p for p in shared], device=dev))
        model.hidden_states(pad_rows([rows[f][:p] for f, p in zip(firsts, shared)], 0, left=True).to(dev), cache)
        cache = cache.repeat_rows(sizes)  # (items, ...) -> (rows, ...)
    x = pad_rows([r[p:-1] for r, p in zip(rows, own)], 0).to(dev)  # (B, longest rest)
    y = pad_rows([[-100] * (s - 1 - p) + r[s:] for r, s, p in zip(rows, starts, own)], -100).to(dev)
    return model.hidden_states(x, cache), y


@torch.no_grad()
def score_choices(model, items, dev, ctx, batch_size=1, progress=None, share_context=True):
    """items: for each item its choices' (context ids, continuation ids) -> for each item, each choice's
    (log-likelihood of its continuation, its tokens). The choices of batch_size items go through the model as one
    batch, right-padded (pad_rows): padding follows a row's tokens, so causal attention never lets them see it.
    A row longer than the context keeps its last block_size + 1 tokens (lm-eval's cropping). batch_size=0: each
    choice alone, one forward pass each (for comparison). share_context: see continuation_states."""
    if batch_size == 0:
        alone = iter(score_choices(model, [[pair] for item in items for pair in item], dev, ctx, 1, progress))
        return [[next(alone)[0] for _ in item] for item in items]
    T, V = model.config.block_size, model.config.vocab_size
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(items), batch_size):
        group = items[i:i + batch_size]
        pairs = [pair for item in group for pair in item]
        rows = [(c + e)[-T - 1:] for c, e in pairs]
        starts = [max(len(r) - len(e), 1) for r, (_, e) in zip(rows, pairs)]  # where each continuation starts
        with ctx:  # the head only where a continuation token is predicted: the rest of (B, T, vocab) is not needed
            states, y = continuation_states(model, rows, starts, [len(item) for item in group], dev, share_context)
            scored = y != -100
            logits = model.lm_head(states[scored])[:, :V].float()  # (N, vocab)
        logp = logits.log_softmax(-1).gather(1, y[scored][:, None])[:, 0]  # (N,)
        sums = torch.zeros(len(rows), device=logp.device).index_add_(0, scored.nonzero()[:, 0], logp).tolist()
        counts = scored.sum(1).tolist()
        for item in group:
            out.append(list(zip(sums[:len(item)], counts[:len(item)])))
            sums, counts = sums[len(item):], counts[len(item):]
        if progress:
            progress(min(i + batch_size, len(items)))
    model.train(was_training)
    return out


def best(values):  # the first highest, as numpy's argmax
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_multiple_choice(model, tokenizer, task, items, dev, ctx, progress=None):
    """(metrics {name: value}, each item's chosen index under each metric)."""
    encoded = [[encode_pair(tokenizer, c, e) for c, e in item['requests']] for item in items]
    T = model.config.block_size
    cropped = sum(any(len(c) + len(e) > T + 1 for c, e in pairs) for pairs in encoded)
    if cropped:
        print(f"notice: {cropped} of {len(items)} {task} prompts are longer than the model's context of {T} "
              f"tokens; their starts are cropped (as lm-eval does)", file=sys.stderr)
    scores = score_choices(model, encoded, dev, ctx, batch_size, progress)
    picks = [{'acc': best([s for s, _ in sc]),
              'acc_norm': best([s / len(c) for (s, _), c in zip(sc, item['choices'])])}
             for sc, item in zip(scores, items)]
    if task == 'hellaswag':
        llmc = score_choices(model, [llmc_pairs(*item['llmc'], tokenizer) for item in items], dev, ctx, batch_size)
        for pick, sc in zip(picks, llmc):
            pick['acc_norm_llmc'] = best([s / n for s, n in sc])  # the lowest mean loss per token
    metrics = {m: sum(p[m] == item['label'] for p, item in zip(picks, items)) / len(items) for m in TASKS[task][1]}
    return metrics, picks


def score_gsm8k(model, tokenizer, items, dev, ctx, style, progress=None):
    """exact_match: greedy answers, the final one checked by the GRPO verifier (the last \\boxed{}, "answer is" or
    number); a few-shot answer ends where the model starts the next "Question:"."""
    end_id = response_end_id(tokenizer, style) if style else tokenizer.eot_id
    room = model.config.block_size - max_new_tokens
    prompts = [tokenizer.encode(gsm8k_prompt(item, style)) for item in items]
    if max(map(len, prompts)) > room:
        print(f"notice: GSM8K prompts longer than {room} tokens (the context less --max_new_tokens) keep their "
              "last ones", file=sys.stderr)
    correct, answers = 0, []
    for i in range(0, len(items), gen_batch_size):
        with ctx:
            done = generate_batch(model, [p[-room:] for p in prompts[i:i + gen_batch_size]], end_id, max_new_tokens)
        for item, ids in zip(items[i:i + gen_batch_size], done):
            text = tokenizer.decode([t for t in ids if t != end_id]).split('Question:')[0]
            answers.append(text)
            correct += is_correct(text, item['answer'], 'math')
        if progress:
            progress(min(i + gen_batch_size, len(items)))
    return {'exact_match': correct / len(items)}, answers


def show_progress(task, total):
    """A progress line (items/s, ETA) on stderr, for score_choices to call with how many items are done."""
    t0 = shown = time.time()

    def show(done):
        nonlocal shown
        if time.time() - shown < 0.5 and done < total:
            return
        shown = time.time()
        rate = done / max(shown - t0, 1e-9)
        eta = (total - done) / rate if rate else 0
        print(f"\r{task}: {done}/{total} items, {rate:.1f} items/s, ETA {eta // 60:.0f}m{eta % 60:02.0f}s   ",
              end='', file=sys.stderr, flush=True)
    return show


def results_path(info):
    """--out, else eval.json beside a checkpoint of ours, else None (nothing written)."""
    if out:
        return Path(out)
    if info['checkpoint'] is None:
        return None
    path = Path(out_dir) if init_from == 'resume' else Path(init_from)
    return (path.parent if path.suffix == '.pt' else path) / 'eval.json'


def check_settings():
    """The task names and --limit, before anything loads: one line for a wrong one."""
    names = [t.strip() for t in tasks.split(',') if t.strip()]
    unknown = [t for t in names if t not in TASKS] or ([] if names else [tasks])
    if unknown:
        die(f"unknown task {unknown[0]!r}; the known tasks are {', '.join(TASKS)}")
    if limit is not None and (type(limit) is not int or limit < 1):
        die(f"--limit={limit!r}: give a number of items above 0, or leave it out for all")
    if out and Path(out).is_dir():
        die(f"--out={out} is a folder; give a file name such as {Path(out) / 'eval.json'}")
    return names


if __name__ == '__main__':
    configure(globals())
    names = check_settings()
    device, device_type, dtype, ctx = setup(device, dtype, seed)
    try:
        talk_dtype(quantize, device_type, dtype)  # an unknown scheme stops before anything loads
        # every task's data first: a bad file stops the run before the model loads
        task_items = {task: read_items(task, Path(data_dir) / task, limit) for task in names}
        model, info = load_pretrained(init_from, out_dir=out_dir)
        tokenizer = get_tokenizer(info['tokenizer'])
        style = info['prompt_style'] if chat_style == 'auto' else None if chat_style == 'fewshot' else chat_style
        if 'gsm8k' in names and style:
            if style not in PROMPT_STYLES:
                raise ValueError(f"--chat_style={chat_style}: use auto, fewshot, {', '.join(PROMPT_STYLES)}")
            response_end_id(tokenizer, style)
        if 'gsm8k' in names and model.config.block_size <= max_new_tokens:
            raise ValueError(f"--max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                             f"context of {model.config.block_size}")
    except (OSError, ValueError) as e:
        die(e)
    cast_and_quantize(model.eval(), quantize, device_type, dtype).to(device)
    where = results_path(info)
    print(f"{'task':<15}{'shots':>6}  {'metric':<15}{'score':>8}{'items':>8}{'seconds':>9}")
    results = {}
    for task in names:
        items, t0 = task_items[task], time.time()
        progress = show_progress(task, len(items))
        if task == 'gsm8k':
            metrics, _ = score_gsm8k(model, tokenizer, items, device, ctx, style, progress)
        else:
            metrics, _ = score_multiple_choice(model, tokenizer, task, items, device, ctx, progress)
        print('\r' + ' ' * 70 + '\r', end='', file=sys.stderr)
        seconds = time.time() - t0
        for k, (metric, value) in enumerate(metrics.items()):
            print(f"{task if k == 0 else '':<15}{TASKS[task][0] if k == 0 else '':>6}  {metric:<15}{value:>8.4f}"
                  + (f"{len(items):>8}{seconds:>9.1f}" if k == 0 else ''), flush=True)
        results[task] = {**metrics, 'n': len(items)}
    if where is not None:
        where.parent.mkdir(parents=True, exist_ok=True)
        save_json(where, results)
        print(f"wrote {where}")
