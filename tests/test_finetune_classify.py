"""finetune_classify.py (chapter 6): data handling, padding-aware pooling, freezing, learning, downloads."""
import hashlib
import json
import random
import zipfile

import pytest
import torch

import finetune_classify as fc
from conftest import SHARED, assert_one_line_error, run_here, run_script
from model import GPT, GPTConfig
from weights import load_checkpoint, save_checkpoint

WORDS = 'the a my your we they see saw like have get big small old new red blue day night'.split()


def synthetic(path, n=240, seed=0):
    """label<TAB>text lines: 'spam' texts contain a prize word, 'ham' texts a family word."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        label = 'spam' if i % 2 else 'ham'
        key = rng.choice(['prize', 'winner', 'cash', 'free'] if label == 'spam' else ['mum', 'dad', 'home', 'dinner'])
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        words.insert(rng.randint(0, len(words)), key)
        lines.append(f"{label}\t{' '.join(words)}")
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return path


def base_checkpoint(folder):
    """A small 'pretrained' byte-level GPT, as train.py would save it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(folder / 'ckpt.pt', model, 'bytes', {})
    return model


def test_last_real_token_is_read_not_the_padding():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16)).eval()
    model.lm_head = torch.nn.Linear(16, 3)
    a, b = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10, 11, 12, 13])
    x = torch.full((2, 8), 49)
    x[0, :3], x[1, :6] = a, b
    lengths = torch.tensor([3, 6])
    with torch.no_grad():
        got = fc.classify_logits(model, x, lengths, 'last')
        alone = torch.cat([model.lm_head(model.hidden_states(t[None])[:, -1]) for t in (a, b)])
        assert torch.allclose(got, alone, atol=1e-6)
        padded_end = model.lm_head(model.hidden_states(x)[:, -1])  # what reading position -1 would give
        assert not torch.allclose(got[0], padded_end[0], atol=1e-3)
        mean = fc.classify_logits(model, x, lengths, 'mean')
        assert torch.allclose(mean[0], model.lm_head(model.hidden_states(a[None])[0].mean(0)), atol=1e-6)


def test_classifier_learns(tmp_path):
    base_checkpoint(tmp_path)
    data = synthetic(tmp_path / 'syn.tsv', n=400)
    out = tmp_path / 'out'
    proc = run_script('finetune_classify.py', f'--data={data}', f'--init_from={tmp_path}', f'--out_dir={out}',
                      '--trainable=all', '--learning_rate=3e-3', '--num_epochs=10', '--batch_size=16',
                      '--eval_interval=10', '--eval_iters=2')
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['train_accuracy'] > 0.9 and metrics['test_accuracy'] > 0.75, metrics  # chance is 0.5
    assert {'train_loss', 'val_loss', 'test_loss', 'val_accuracy'} <= set(metrics)
    ckpt = load_checkpoint(out / 'classifier.pt')
    assert ckpt['labels'] == ['ham', 'spam'] and ckpt['model']['lm_head.weight'].shape == (2, 32)
    spam = run_script('finetune_classify.py', '--init_from=resume', f'--out_dir={out}',
                      '--classify=free cash prize now')
    ham = run_script('finetune_classify.py', '--init_from=resume', f'--out_dir={out}', '--classify=see mum at home')
    assert spam.stdout.startswith('spam (') and ham.stdout.startswith('ham ('), spam.stdout + ham.stdout


def test_last_block_training_freezes_the_rest(tmp_path):
    base = base_checkpoint(tmp_path)
    data = synthetic(tmp_path / 'syn.tsv', n=60)
    proc = run_script('finetune_classify.py', f'--data={data}', f'--init_from={tmp_path}', f'--out_dir={tmp_path}/o',
                      '--trainable=last_block', '--learning_rate=1e-2', '--max_iters=5', '--eval_interval=100')
    assert proc.returncode == 0, proc.stderr
    before = base.state_dict()
    for k, v in load_checkpoint(tmp_path / 'o' / 'classifier.pt')['model'].items():
        # the book's choice: last block + final norm (+ head)
        if k.startswith(('transformer.h.1.', 'transformer.ln_f.')):
            assert not torch.equal(v, before[k]), f"{k} should have trained"
        elif not k.startswith('lm_head.'):
            assert torch.equal(v, before[k]), f"{k} should be frozen"


def test_lora_trains_only_adapters_and_head(tmp_path):
    base = base_checkpoint(tmp_path)
    data = synthetic(tmp_path / 'syn.tsv', n=60)
    proc = run_script('finetune_classify.py', f'--data={data}', f'--init_from={tmp_path}', f'--out_dir={tmp_path}/o',
                      '--trainable=lora', '--lora_rank=4', '--learning_rate=1e-2', '--max_iters=5', '--num_epochs=1',
                      '--eval_interval=100')
    assert proc.returncode == 0, proc.stderr
    assert '4,162 trainable (lora)' in proc.stdout  # 2 layers x (512 + 256 + 640 + 640) adapter + 66 head
    ckpt = load_checkpoint(tmp_path / 'o' / 'classifier.pt')
    assert not any('lora' in k for k in ckpt['model'])  # merged into plain weights for saving
    name = 'transformer.h.0.attn.c_attn.weight'
    assert not torch.equal(ckpt['model'][name], base.state_dict()[name])


def test_csv_with_three_classes_and_balancing(tmp_path):
    lines = ['id,label,text'] + [f'{i},{"abc"[i % 3]},"text number {i}, with a comma"' for i in range(60)] + \
            [f'{60 + i},a,"extra a {i}"' for i in range(30)]
    (tmp_path / 'd.csv').write_text('\n'.join(lines), encoding='utf-8')
    rows = fc.read_labelled(tmp_path / 'd.csv')
    assert len(rows) == 90 and rows[0] == ('text number 0, with a comma', 'a')
    splits = fc.balance_and_split(rows, ['a', 'b', 'c'], seed=123)
    assert [len(splits[s]) for s in ('train', 'val', 'test')] == [42, 6, 12]  # 3 x 20 after undersampling
    assert sum(1 for r in splits['train'] + splits['val'] + splits['test'] if r[1] == 'a') == 20


def test_malformed_lines_are_reported_with_their_number(tmp_path):
    (tmp_path / 'd.tsv').write_text('ham\thello\nspam\twin\nthis line has no tab\n', encoding='utf-8')
    with pytest.raises(ValueError, match='line 3: expected label<TAB>text'):
        fc.read_labelled(tmp_path / 'd.tsv')


def test_uci_download_falls_back_to_the_book_mirror_and_unzips(server, tmp_path, monkeypatch):
    zip_path = SHARED / 'data' / 'sms+spam+collection.zip'
    if zip_path.exists():
        body = zip_path.read_bytes()
    else:
        synthetic(tmp_path / 'SMSSpamCollection', n=20)
        with zipfile.ZipFile(tmp_path / 'z.zip', 'w') as z:
            z.write(tmp_path / 'SMSSpamCollection', 'SMSSpamCollection')
        body = (tmp_path / 'z.zip').read_bytes()
    server.routes['/mirror.zip'] = body
    monkeypatch.setattr(fc, 'UCI_URLS', (f'{server.url}/gone.zip', f'{server.url}/mirror.zip'))
    monkeypatch.setattr(fc, 'UCI_SHA256', hashlib.sha256(body).hexdigest())
    tsv = fc.download_sms_spam(tmp_path / 'sms')
    rows = fc.read_labelled(tsv)
    assert {label for _, label in rows} == {'ham', 'spam'}
    if zip_path.exists():
        assert len(rows) == 5574 and sum(label == 'spam' for _, label in rows) == 747


def test_bad_input_gives_one_line_errors(tmp_path):
    base_checkpoint(tmp_path)
    args = (f'--init_from={tmp_path}', f'--out_dir={tmp_path}/o')
    # the first case in a new interpreter: the real no-traceback contract (the others run in this process)
    assert_one_line_error(run_script('finetune_classify.py', '--data=nope.tsv', *args), 'nope.tsv')
    (tmp_path / 'empty.tsv').write_text('')
    assert_one_line_error(run_here('finetune_classify.py', f'--data={tmp_path}/empty.tsv', *args), 'no labelled texts')
    (tmp_path / 'one.tsv').write_text('ham\thi\nham\tthere\n')
    assert_one_line_error(run_here('finetune_classify.py', f'--data={tmp_path}/one.tsv', *args), 'single class')
    synthetic(tmp_path / 'ok.tsv', n=20)
    assert_one_line_error(run_here('finetune_classify.py', f'--data={tmp_path}/ok.tsv', '--trainable=some', *args),
                          '--trainable=some')
    assert_one_line_error(run_here('finetune_classify.py', '--init_from=resume', f'--out_dir={tmp_path}/none',
                                   '--classify=hi'), 'no checkpoint')
    assert not (tmp_path / 'o' / 'classifier.pt').exists()


def test_a_llama_family_model_classifies(tmp_path):
    from conftest import make_llama_folder
    make_llama_folder(tmp_path / 'llama', 'llama3', spread=1.0)
    data = synthetic(tmp_path / 'syn.tsv', n=400)
    out = tmp_path / 'out'
    proc = run_script('finetune_classify.py', f'--data={data}', f'--init_from={tmp_path / "llama"}', f'--out_dir={out}',
                      '--trainable=all', '--learning_rate=3e-3', '--num_epochs=6', '--batch_size=16',
                      '--eval_interval=50', '--eval_iters=2')
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['train_accuracy'] > 0.9 and metrics['test_accuracy'] > 0.75, metrics
    spam = run_script('finetune_classify.py', '--init_from=resume', f'--out_dir={out}',
                      '--classify=free cash prize now')
    assert spam.stdout.startswith('spam ('), spam.stdout + spam.stderr
