"""
Fine-tune a GPT as a text classifier: spam or not (book chapter 6).
    python finetune_classify.py                                  # GPT-2 124M on the UCI SMS Spam Collection
    python finetune_classify.py --data=my_labels.csv --trainable=lora
    python finetune_classify.py --init_from=resume --classify="You won a free cruise! Text WIN to 80086"
"""
import csv
import io
import math
import os
import sys
import time
import zipfile
from itertools import islice
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import configure, run_config, setup, die, maybe_compile, optimizer_step, save_plot
from model import FUSED_ADAMW_DEVICES, GPT, GPTConfig, apply_lora, pad_rows
from weights import (atomic_write, download, load_checkpoint, load_pretrained, load_state_dict_checked,
                     save_checkpoint, save_json)
from tokenizer import get_tokenizer
from prepare_data import read_text

# data
data = ''  # the UCI zip, its SMSSpamCollection (label<TAB>text), a CSV/TSV with text and label columns; '' = UCI's
data_dir = 'data/sms_spam'  # where the UCI data set is downloaded to
balance = True  # undersample every class to the size of the smallest (the book: as many ham as spam)
max_length = 0  # tokens per text: 0 = the longest training text (at most the model's context)
# model
init_from = 'gpt2'  # gpt2 (-medium, -large, -xl), scratch, resume (out_dir/classifier.pt), a ckpt.pt or HF folder
n_layer = 4  # for init_from=scratch
n_head = 4
n_embd = 128
block_size = 256
dropout = 0.0
trainable = 'last_block'  # last_block (the book: last block + final norm + head), all, head, lora
lora_rank = 16
lora_alpha = 16
pool = 'last'  # read the prediction at the last real token (last) or average all real tokens (mean)
# training (the book's settings)
learning_rate = 5e-5
weight_decay = 0.1
num_epochs = 5
batch_size = 8  # texts per step; an epoch's last, shorter batch is dropped (the book's drop_last=True)
max_iters = 0  # stop after this many steps (0 = run all epochs)
eval_interval = 50  # steps between loss estimates; accuracies are estimated at each epoch's end
eval_iters = 5  # batches per loss/accuracy estimate during training
grad_clip = 0.0
seed = 123
device = 'auto'
dtype = 'auto'
compile = False
# the trained classifier
out_dir = 'out-classify'  # where classifier.pt, metrics.json and accuracy-loss.png go
classify = ''  # a text to classify with out_dir/classifier.pt (with --init_from=resume)

UCI_URLS = ('https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip',
            'https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip')  # the book's backup
UCI_SHA256 = 'e0c5bd54da721b0058bfecedfd96dc0be0a323366ca99d4d694817493f47be90'


# -------------------------------------------------------------------- data (ch06 6.2-6.3)

def download_sms_spam(folder):
    """The UCI SMS Spam Collection zip (from UCI, else the book's backup URL), unzipped once."""
    folder = Path(folder)
    tsv = folder / 'SMSSpamCollection'
    if tsv.is_file():
        return tsv
    zip_path = folder / 'sms+spam+collection.zip'
    for url in UCI_URLS[:-1]:
        try:
            return extract_sms_spam(download(url, zip_path, sha256=UCI_SHA256), tsv)
        except OSError as e:
            print(f"{e}\ntrying the backup URL", file=sys.stderr)
    return extract_sms_spam(download(UCI_URLS[-1], zip_path, sha256=UCI_SHA256), tsv)


def extract_sms_spam(zip_path, dest):
    try:
        with zipfile.ZipFile(zip_path) as z:
            member = next((n for n in z.namelist() if n.endswith('SMSSpamCollection')), None)
            if member is None:
                raise ValueError(f"{zip_path} holds no SMSSpamCollection file")
            with atomic_write(dest) as tmp:
                tmp.write_bytes(z.read(member))
    except zipfile.BadZipFile:
        raise ValueError(f"{zip_path} is not a valid zip file; delete it to download it again") from None
    return dest


def read_labelled(path):
    """[(text, label)] from a zip (UCI's), a label<TAB>text file, or a CSV/TSV whose header names text and label."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data={path}: no such file")
    if path.suffix == '.zip':
        path = extract_sms_spam(path, path.with_name('SMSSpamCollection'))
    raw = read_text(path)
    lines = raw.splitlines()
    first = lines[0].lower() if lines else ''
    rows = []
    if 'text' in first and 'label' in first:  # a header row: CSV or TSV by its delimiter
        delim = '\t' if '\t' in lines[0] else ','
        reader = csv.DictReader(io.StringIO(raw), delimiter=delim)
        fields = {f.strip().lower(): f for f in reader.fieldnames}
        for i, row in enumerate(reader, start=2):
            text, label = row.get(fields['text']), row.get(fields['label'])
            if not text or not label or None in row:
                raise ValueError(f"{path} line {i}: expected a text and a label, got {row}")
            rows.append((text, label.strip()))
    else:
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            label, tab, text = line.partition('\t')
            if not tab or not label.strip() or not text.strip():
                raise ValueError(f"{path} line {i}: expected label<TAB>text, got {line[:60]!r}")
            rows.append((text, label.strip()))
    if not rows:
        raise ValueError(f"{path} holds no labelled texts")
    return rows


def balance_and_split(rows, labels, seed):
    """The book's preparation: undersample to the smallest class, shuffle, split 70/10/20."""
    g = torch.Generator().manual_seed(seed)
    if balance:
        by_label = {lab: [r for r in rows if r[1] == lab] for lab in labels}
        n = min(len(v) for v in by_label.values())
        rows = [v[i] for v in by_label.values() for i in torch.randperm(len(v), generator=g)[:n].tolist()]
    rows = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
    a, b = int(0.7 * len(rows)), int(0.8 * len(rows))
    return {'train': rows[:a], 'val': rows[a:b], 'test': rows[b:]}


def encode_split(rows, tokenizer, label_ids, length):
    """Token ids padded with end-of-text to `length` (or cut): x (N, length), real lengths (N,), labels y (N,)."""
    ids = [tokenizer.encode(text)[:length] or [tokenizer.eot_id] for text, _ in rows]
    x = pad_rows(ids, tokenizer.eot_id, length)
    return x, torch.tensor([len(t) for t in ids]), torch.tensor([label_ids[label] for _, label in rows])


# -------------------------------------------------------------------- model (ch06 6.5-6.6)

def classify_logits(model, x, lengths, pool):
    """(B, T) padded token ids -> (B, num_classes), read at each text's last real token (the book reads position -1,
    padding for a short text) or averaged over its real tokens."""
    h = model.hidden_states(x)  # (B, T, C)
    if pool == 'mean':
        mask = (torch.arange(x.size(1), device=x.device)[None, :] < lengths[:, None]).unsqueeze(-1)  # (B, T, 1)
        pooled = (h * mask).sum(1) / lengths[:, None]
    else:
        pooled = h[torch.arange(x.size(0), device=x.device), lengths - 1]  # (B, C)
    return model.lm_head(pooled)


def set_trainable(model, trainable):
    """Freeze what the book freezes; the new head always trains."""
    if trainable == 'lora':
        apply_lora(model, lora_rank, lora_alpha)  # freezes everything but the adapters
    else:
        for p in model.parameters():
            p.requires_grad_(trainable == 'all')
        if trainable == 'last_block':
            for p in [*model.transformer.h[-1].parameters(), *model.transformer.ln_f.parameters()]:
                p.requires_grad_(True)
    for p in model.lm_head.parameters():
        p.requires_grad_(True)


def batches(split, shuffle_gen=None):
    x, lengths, y = split
    order = torch.randperm(len(y), generator=shuffle_gen) if shuffle_gen is not None else torch.arange(len(y))
    for i in range(0, len(y), batch_size):
        idx = order[i:i + batch_size]
        if shuffle_gen is not None and len(idx) < batch_size and i:
            break  # drop_last=True for training, as the book
        yield x[idx], lengths[idx], y[idx]


@torch.no_grad()
def evaluate(model, split, dev, ctx, num_batches=None):
    """(loss, accuracy) over the first num_batches batches of a split (all if None)."""
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    for x, lengths, y in islice(batches(split), num_batches):
        x, lengths, y = x.to(dev), lengths.to(dev), y.to(dev)
        with ctx:
            logits = classify_logits(model, x, lengths, pool).float()
        total_loss += F.cross_entropy(logits, y, reduction='sum').item()
        correct += (logits.argmax(-1) == y).sum().item()
        n += len(y)
    model.train()
    return total_loss / max(n, 1), correct / max(n, 1)


def load_classifier(path, dev):
    """(model, tokenizer, checkpoint) from a classifier.pt written by this script."""
    ckpt = load_checkpoint(path, map_location='cpu')
    if 'labels' not in ckpt:
        raise ValueError(f"{path} is not a classifier checkpoint (no labels); train one with finetune_classify.py")
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.lm_head = nn.Linear(model.config.n_embd, len(ckpt['labels']))
    load_state_dict_checked(model, ckpt['model'], str(path))
    return model.to(dev).eval(), get_tokenizer(ckpt['tokenizer']), ckpt


def print_prediction(text, dev, ctx):
    """The label out_dir/classifier.pt gives a text, with its probability."""
    try:
        model, tokenizer, ckpt = load_classifier(Path(out_dir) / 'classifier.pt', dev)
    except (OSError, ValueError) as e:
        die(e)
    ids = tokenizer.encode(text)[:ckpt['max_length']] or [tokenizer.eot_id]
    with torch.no_grad(), ctx:
        probs = F.softmax(classify_logits(model, torch.tensor([ids], device=dev),
                                          torch.tensor([len(ids)], device=dev), ckpt['pool']).float(), -1)[0]
    best = int(probs.argmax())
    print(f"{ckpt['labels'][best]} ({probs[best].item():.3f})")


def load_data():
    """(rows, sorted labels, the balanced train/val/test splits) of --data, or of UCI's data set."""
    try:
        rows = read_labelled(data or download_sms_spam(data_dir))
    except (OSError, ValueError) as e:
        die(e)
    labels = sorted({label for _, label in rows})  # ham=0, spam=1, as the book
    if len(labels) < 2:
        die(f"{data or 'the data'} has a single class ({labels[0]!r}); a classifier needs at least two")
    splits = balance_and_split(rows, labels, seed)
    if min(len(s) for s in splits.values()) == 0:
        die(f"{data or 'the data'} has too few texts ({len(rows)}) to split 70/10/20; give more")
    return rows, labels, splits


def load_model(labels):
    """(model, tokenizer): a pretrained GPT with a new n_embd -> num_classes head, or out_dir's classifier (on CPU)."""
    try:
        if init_from == 'resume':
            model, tokenizer, ckpt = load_classifier(Path(out_dir) / 'classifier.pt', 'cpu')
            if ckpt['labels'] != labels:
                die(f"{out_dir}/classifier.pt knows labels {ckpt['labels']} but the data has {labels}")
            model.train()
        else:
            scratch = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                                vocab_size=50257, dropout=dropout)  # GPT-2's tokenizer
            model, info = load_pretrained(init_from, torch.float32, scratch=scratch, dropout=dropout)
            tokenizer = get_tokenizer(info['tokenizer'])
            torch.manual_seed(seed)
            model.lm_head = nn.Linear(model.config.n_embd, len(labels))  # the classification head (6.5)
    except (OSError, ValueError) as e:
        die(e)
    return model, tokenizer


def main():
    dev, device_type, amp_dtype, ctx = setup(device, dtype, seed)
    if trainable not in ('last_block', 'all', 'head', 'lora'):
        die(f"--trainable={trainable}: use last_block, all, head or lora")
    if pool not in ('last', 'mean'):
        die(f"--pool={pool}: use last or mean")
    if classify:  # use a trained classifier
        return print_prediction(classify, dev, ctx)
    rows, labels, splits = load_data()
    model, tokenizer = load_model(labels)
    set_trainable(model, trainable)
    model.to(dev)
    label_ids = {label: i for i, label in enumerate(labels)}
    longest = max(len(tokenizer.encode(text)) for text, _ in splits['train'])
    length = min(max_length or longest, model.config.block_size)
    enc = {name: encode_split(rs, tokenizer, label_ids, length) for name, rs in splits.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"{len(rows):,} texts, labels {label_ids}; after balancing: {len(splits['train'])} train, "
          f"{len(splits['val'])} val, {len(splits['test'])} test; {length} tokens per text\n{init_from}: "
          f"{model.get_num_params():,} parameters, {sum(p.numel() for p in params):,} trainable ({trainable}); "
          f"{dev} {amp_dtype}")

    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay,
                                  fused=device_type in FUSED_ADAMW_DEVICES)
    scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == 'float16')
    fwd = maybe_compile(classify_logits, compile, device_type)
    shuffle = torch.Generator().manual_seed(seed)
    history, step, t0 = [], 0, time.time()
    os.makedirs(out_dir, exist_ok=True)
    for epoch in range(num_epochs):  # train_classifier_simple (6.6)
        for x, lengths, y in batches(enc['train'], shuffle):
            x, lengths, y = x.to(dev), lengths.to(dev), y.to(dev)
            with ctx:
                loss = F.cross_entropy(fwd(model, x, lengths, pool).float(), y)
            optimizer_step(loss, optimizer, scaler, params, grad_clip)
            step += 1
            if step % eval_interval == 0:
                tl, vl = (evaluate(model, enc[s], dev, ctx, eval_iters)[0] for s in ('train', 'val'))
                history.append({'step': step, 'train_loss': tl, 'val_loss': vl})
                print(f"epoch {epoch + 1} step {step}: train loss {tl:.3f}, val loss {vl:.3f} "
                      f"({(time.time() - t0) / step * 1000:.0f} ms/step)")
            if max_iters and step >= max_iters:
                break
        ta, va = (evaluate(model, enc[s], dev, ctx, eval_iters)[1] for s in ('train', 'val'))
        last = history[-1] if history else {'train_loss': math.nan, 'val_loss': math.nan}  # every row has losses
        history.append({**last, 'step': step, 'train_accuracy': ta, 'val_accuracy': va})
        print(f"epoch {epoch + 1}: train accuracy {100 * ta:.1f}%, val accuracy {100 * va:.1f}% "
              f"(on {eval_iters} batches)")
        if max_iters and step >= max_iters:
            break

    # results on the whole of each split (6.7)
    metrics = {'steps': step, 'minutes': (time.time() - t0) / 60}
    for name in ('train', 'val', 'test'):
        metrics[f'{name}_loss'], metrics[f'{name}_accuracy'] = evaluate(model, enc[name], dev, ctx)
    print(' | '.join(f"{n} accuracy {100 * metrics[f'{n}_accuracy']:.2f}%" for n in ('train', 'val', 'test')))
    save_json(Path(out_dir) / 'metrics.json', {**metrics, 'labels': labels, 'init_from': init_from,
                                               'trainable': trainable, 'pool': pool})
    config = run_config(globals())  # what this run was asked to do, for the checkpoint
    save_checkpoint(Path(out_dir) / 'classifier.pt', model, tokenizer.spec, config, labels=labels, max_length=length,
                    pool=pool, metrics=metrics)
    accuracies = [h for h in history if 'train_accuracy' in h]  # the epochs' ends; every row has losses
    save_plot(Path(out_dir) / 'accuracy-loss.png', 'Step', [
        (name, [h['step'] for h in points], [h[f'train_{key}'] for h in points], [h[f'val_{key}'] for h in points])
        for name, key, points in (('Loss', 'loss', history), ('Accuracy', 'accuracy', accuracies))])
    print(f"saved {out_dir}/classifier.pt; try --init_from=resume --classify=\"Congratulations, you won!\"")


if __name__ == '__main__':
    configure(globals())
    main()
