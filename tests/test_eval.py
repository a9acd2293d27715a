"""eval.py: every task's prompts as lm-evaluation-harness writes them, its scores equal to transformers' GPT-2
scoring the same items one request at a time, the downloads from each source's files, and one line for bad input.
The data are tests/fixtures/eval/ (make_eval_fixtures.py): items of our own making in each source's file format."""
import copy
import csv
import hashlib
import importlib
import io
import json
import shutil
import tarfile
import zipfile
from contextlib import nullcontext

import pytest
import torch

from conftest import FIXTURES, assert_one_line_error, needs_gpt2_bpe, run_here, run_script, spread_weights

DATA = FIXTURES / 'eval'
LIMIT = 8  # items of each task the transformers comparison scores (MMLU: of each subject)
CHOICE_TASKS = ('hellaswag', 'arc_easy', 'arc_challenge', 'piqa', 'winogrande', 'mmlu')
ev = importlib.import_module('eval')


def items(task, **kw):
    return ev.read_items(task, DATA / task, **kw)


# -------------------------------------------------------------------- the prompts, literally

def test_each_task_prompt_is_lm_evals():
    hs = items('hellaswag')[0]  # activity label, ctx_a, ctx_b capitalised; [title] a sentence break, [tags] gone
    assert hs['requests'][0] == ('Home and Garden: How to care for a kettle. Find a quiet place. Tom measures the '
                                 'kettle. The window', ' repairs the lantern slowly and carefully.')
    assert hs['requests'][1][1] == '  puts the violin away .'  # stripped before the tag goes, as lm-eval does
    assert hs['label'] == 0 and hs['choices'][1] == ' puts the violin away .'
    arc = items('arc_easy')[0]
    assert arc['requests'][2] == ('Question: Jonas puts a mirror in the sun for 2 hours. Which is what happens?\n'
                                  'Answer:', ' the orchard sinks')
    assert arc['label'] == 0 and len(arc['requests']) == 4
    numeric = [json.loads(line) for line in (DATA / 'arc_easy' / 'ARC-Easy-Test.jsonl').open()][3]
    assert numeric['answerKey'] in '12345' and items('arc_easy')[3]['label'] == \
        [c['label'] for c in numeric['question']['choices']].index(numeric['answerKey'])
    piqa = items('piqa')[0]
    assert piqa['requests'] == [('Question: How do I keep a orchard clean?\nAnswer:', ' Dust it.'),
                                ('Question: How do I keep a orchard clean?\nAnswer:', ' Burn it.')]
    assert piqa['label'] == 0 and items('piqa')[1]['label'] == 1
    wino = items('winogrande')  # partial scoring: the option in the blank is the context, the rest is scored
    assert wino[0]['requests'] == [('The lantern did not fit in the harbor because the lantern', ' was too big.'),
                                   ('The lantern did not fit in the harbor because the box', ' was too big.')]
    assert wino[0]['label'] == 0 and wino[1]['label'] == 1
    assert wino[30]['requests'][1] == ('The ladder fell on the kettle, so kettle', " 's handle broke.")
    mmlu = items('mmlu')[0]
    context = mmlu['requests'][0][0]
    assert context.startswith('The following are multiple choice questions (with answers) about abstract algebra.\n\n'
                              'What is the order of the mirror group Z_2?\nA. 84\nB. 84, or "ladder"\nC. pillow\n'
                              'D. None of these (0)\nAnswer: A\n\nWhat is the order of the harbor group Z_3?\n')
    assert context.endswith('\n\nWhat is the order of the lantern group Z_2?\nA. 12\nB. 56, or "violin"\nC. candle\n'
                            'D. None of these (0)\nAnswer:')
    assert context.count('\nAnswer: ') == 5 and [e for _, e in mmlu['requests']] == [' A', ' B', ' C', ' D']
    gsm = items('gsm8k')[0]
    prompt = ev.gsm8k_prompt(gsm)
    assert prompt.startswith('Question: Samuel buys 24 boxes of violins with 11 in each box, a thousand times over. '
                             'How many are there?\nAnswer: There are 24 * 11 = <<24*11=264>>264 in all.\n#### 264,000'
                             '\n\nQuestion: ')
    assert prompt.endswith('\n\nQuestion: Priya buys 41 boxes of mirrors with 40 in each box, a thousand times over. '
                           'How many are there?\nAnswer:')
    assert prompt.count('Question:') == 9 and gsm['answer'] == '1,640,000'
    chat = ev.gsm8k_prompt(gsm, 'chatml')
    assert chat.startswith('<|im_start|>user\nSolve this math problem') and chat.endswith('<|im_start|>assistant\n')


@needs_gpt2_bpe
def test_context_and_continuation_are_encoded_as_lm_eval_encodes_a_pair():
    from tokenizer import get_tokenizer
    tok = get_tokenizer('gpt2')
    assert ev.encode_pair(tok, 'Answer: ', 'A') == (tok.encode('Answer:'), tok.encode(' A'))  # the space moves
    assert ev.encode_pair(tok, '', ' x') == ([tok.eot_id], tok.encode(' x'))  # no context: end-of-text
    whole = tok.encode('They said it12345')  # the whole text, split after the context's own tokens
    assert tok.encode('They said it1') != whole[:len(tok.encode('They said it1'))]  # (a merge across the seam)
    assert ev.encode_pair(tok, 'They said it1', '2345') == (tok.encode('They said it1'),
                                                            whole[len(tok.encode('They said it1')):])


def test_limit_takes_each_mmlu_subjects_first_items():
    assert len(items('hellaswag', limit=7)) == 7
    mmlu = items('mmlu', limit=3)
    assert [m['subject'] for m in mmlu] == ['abstract_algebra'] * 3 + ['high_school_physics'] * 3


# -------------------------------------------------------------------- scores equal transformers'

def lm_eval_items(task):
    """(requests, choice texts, label) per item, written from lm-eval's task definitions, independently of eval.py."""
    folder = DATA / task
    if task == 'mmlu':
        out = []
        for subject in ('abstract_algebra', 'high_school_physics'):
            def read(split):
                return list(csv.reader((folder / 'data' / split / f'{subject}_{split}.csv').open(encoding='utf-8')))

            def text(r):
                return f"{r[0].strip()}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\nAnswer:"
            head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
            head += ''.join(text(r) + ' ' + r[5] + '\n\n' for r in read('dev')[:5])
            out += [([(head + text(r), ' ' + c) for c in 'ABCD'], list('ABCD'), 'ABCD'.index(r[5]))
                    for r in read('test')]
        return out
    name = {'hellaswag': 'hellaswag_val.jsonl', 'arc_easy': 'ARC-Easy-Test.jsonl', 'piqa': 'valid.jsonl',
            'arc_challenge': 'ARC-Challenge-Test.jsonl', 'winogrande': 'dev.jsonl'}[task]
    rows, out = [json.loads(line) for line in (folder / name).open(encoding='utf-8')], []
    for k, r in enumerate(rows):
        if task == 'hellaswag':
            def clean(t):
                import re
                return re.sub('\\[.*?\\]', '', t.strip().replace(' [title]', '. ')).replace('  ', ' ')
            query = clean(r['activity_label'] + ': ' + r['ctx_a'] + ' ' + r['ctx_b'].capitalize())
            choices, label = [clean(e) for e in r['endings']], r['label']
        elif task.startswith('arc'):
            query = f"Question: {r['question']['stem']}\nAnswer:"
            choices = [c['text'] for c in r['question']['choices']]
            label = [c['label'] for c in r['question']['choices']].index(r['answerKey'])
        elif task == 'piqa':
            labels = (folder / 'valid-labels.lst').read_text().split()
            query, choices, label = f"Question: {r['goal']}\nAnswer:", [r['sol1'], r['sol2']], int(labels[k])
        else:
            i = r['sentence'].index('_')
            choices = [r['sentence'][:i] + r['option1'], r['sentence'][:i] + r['option2']]
            out.append(([(c, ' ' + r['sentence'][i + 1:].strip()) for c in choices], choices, int(r['answer']) - 1))
            continue
        out.append(([(query, ' ' + c) for c in choices], choices, label))
    return out


def hf_loglikelihood(hf, tok, context, continuation, block_size, separate=False):
    """(sum of log p, tokens) of continuation after context by transformers, one request alone, encoded as lm-eval
    encodes a pair (or, separate: each on its own, as llm.c); the row cropped to its last block_size + 1 tokens."""
    if separate:
        c, e = tok.encode(context), tok.encode(continuation)
    else:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, c = tok.encode(context + continuation), tok.encode(context)
        e = whole[len(c):]
    ids = (c + e)[-block_size - 1:]
    with torch.no_grad():
        logp = hf(torch.tensor([ids[:-1]])).logits[0, -len(e):].float().log_softmax(-1)
    return logp.gather(1, torch.tensor(ids[-len(e):])[:, None]).sum().item(), len(e)


def first_best(values):
    return max(range(len(values)), key=lambda i: (values[i], -i))


@pytest.fixture(scope='module')
def tiny_gpt2(tmp_path_factory):
    """(our model, transformers' GPT2LMHeadModel of the same weights, the GPT-2 tokenizer, their folder)."""
    transformers = pytest.importorskip('transformers')
    from model import GPT, GPTConfig
    from tokenizer import get_tokenizer
    from weights import save_pretrained
    torch.manual_seed(0)
    model = spread_weights(GPT(GPTConfig(block_size=512, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)), 4).eval()
    folder = tmp_path_factory.mktemp('tiny_gpt2') / 'm'
    save_pretrained(model, folder)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    return model, hf, get_tokenizer('gpt2'), folder


@needs_gpt2_bpe
@pytest.mark.parametrize('task', CHOICE_TASKS)
def test_choices_and_scores_equal_transformers(tiny_gpt2, task):
    model, hf, tok, _ = tiny_gpt2
    ours = items(task, limit=LIMIT)
    metrics, picks = ev.score_multiple_choice(model, tok, task, ours, 'cpu', nullcontext())
    theirs = lm_eval_items(task)  # (all; MMLU's subjects one after the other)
    theirs = theirs[:LIMIT] + theirs[12:12 + LIMIT] if task == 'mmlu' else theirs[:LIMIT]
    assert [it['requests'] for it in ours] == [r for r, _, _ in theirs]  # the same text, built independently
    expected = {m: [] for m in ev.TASKS[task][1]}
    for (requests, choices, label), it in zip(theirs, ours):
        sums = [hf_loglikelihood(hf, tok, c, e, 512)[0] for c, e in requests]
        expected['acc'].append(first_best(sums))
        if 'acc_norm' in expected:
            expected['acc_norm'].append(first_best([s / len(c) for s, c in zip(sums, choices)]))
        if task == 'hellaswag':  # llm.c's: the raw context, each ending encoded alone, the mean per token
            ctx, endings = it['llmc']
            scored = [hf_loglikelihood(hf, tok, ctx, ' ' + e, 512, separate=True) for e in endings]
            expected['acc_norm_llmc'].append(first_best([s / n for s, n in scored]))
    labels = [label for _, _, label in theirs]
    for m, chosen in expected.items():
        assert [p[m] for p in picks] == chosen, m
        assert metrics[m] == sum(c == y for c, y in zip(chosen, labels)) / len(labels), m
    assert len({tuple(p.values()) for p in picks}) > 1  # the choices vary: were they all equal, it would prove little


@needs_gpt2_bpe
def test_a_prompt_longer_than_the_context_is_cropped_from_the_left_as_lm_eval_does(tiny_gpt2, capsys):
    model, hf, tok, _ = tiny_gpt2
    model = copy.deepcopy(model)
    model.crop_block_size(40)  # MMLU's 5-shot prompts are hundreds of tokens
    mmlu = items('mmlu', limit=2)
    _, picks = ev.score_multiple_choice(model, tok, 'mmlu', mmlu, 'cpu', nullcontext())
    assert 'notice: 4 of 4 mmlu prompts are longer than the model\'s context of 40 tokens' in capsys.readouterr().err
    expected = [[hf_loglikelihood(hf, tok, c, e, 40)[0] for c, e in it['requests']] for it in mmlu]
    assert [p['acc'] for p in picks] == [first_best(sums) for sums in expected]
    scores = ev.score_choices(model, [[ev.encode_pair(tok, c, e) for c, e in it['requests']] for it in mmlu], 'cpu',
                              nullcontext())
    assert [[s for s, _ in item] for item in scores] == [pytest.approx(sums, abs=1e-4) for sums in expected]


@needs_gpt2_bpe
def test_batching_items_changes_no_score(tiny_gpt2):
    model, _, tok, _ = tiny_gpt2
    encoded = [[ev.encode_pair(tok, c, e) for c, e in it['requests']] for it in items('arc_easy', limit=9)]
    one = ev.score_choices(model, [[pair] for item in encoded for pair in item], 'cpu', nullcontext())
    for batch_size in (4, 0):  # four items' choices in one batch; each choice alone
        batched = ev.score_choices(model, encoded, 'cpu', nullcontext(), batch_size=batch_size)
        assert [len(item) for item in batched] == [len(item) for item in encoded]
        flat = [s for item in batched for s in item]
        assert [n for _, n in flat] == [n for [(_, n)] in one]
        assert [s for s, _ in flat] == pytest.approx([s for [(s, _)] in one], abs=1e-4)


def test_gsm8k_answers_are_cut_at_the_next_question_and_checked_by_the_grpo_verifier(monkeypatch):
    from tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    problems = items('gsm8k', limit=3)  # answers 1,640,000, then two more
    replies = ['41 * 40 * 1000 = 1640000.\n#### 1,640,000\n\nQuestion: a new one? Answer: 7',
               f"so it is 5.\n#### {problems[1]['answer']}", 'The final answer is 12345']
    monkeypatch.setattr(ev, 'generate_batch', lambda model, prompts, end_id, n: [tok.encode(r) for r in replies])
    model = type('M', (), {'config': type('C', (), {'block_size': 4096})()})()
    metrics, answers = ev.score_gsm8k(model, tok, problems, 'cpu', nullcontext(), None)
    assert answers[0] == '41 * 40 * 1000 = 1640000.\n#### 1,640,000\n\n' and metrics['exact_match'] == 2 / 3


# -------------------------------------------------------------------- the script, end to end

@needs_gpt2_bpe
def test_eval_prints_one_table_and_writes_json_beside_a_checkpoint(tiny_gpt2, tmp_path):
    model, _, tok, _ = tiny_gpt2
    from weights import save_checkpoint
    save_checkpoint(tmp_path / 'run' / 'ckpt.pt', model, 'gpt2', {})
    proc = run_script('eval.py', f'--init_from={tmp_path}/run', f'--data_dir={DATA}', '--limit=6',
                      '--tasks=hellaswag,winogrande,mmlu,gsm8k', '--max_new_tokens=8')
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ['task', 'shots', 'metric', 'score', 'items', 'seconds']
    assert lines[1].split()[:5] == ['hellaswag', '0', 'acc', lines[1].split()[3], '6']
    assert 'items/s' in proc.stderr and 'ETA' in proc.stderr
    results = json.loads((tmp_path / 'run' / 'eval.json').read_text())
    assert list(results) == ['hellaswag', 'winogrande', 'mmlu', 'gsm8k']
    assert results['mmlu']['n'] == 12 and set(results['hellaswag']) == {'acc', 'acc_norm', 'acc_norm_llmc', 'n'}
    expected, _ = ev.score_multiple_choice(model, tok, 'winogrande', items('winogrande', limit=6), 'cpu',
                                           nullcontext())
    assert results['winogrande'] == {**expected, 'n': 6}


def test_unknown_task_names_the_known_ones():
    proc = run_here('eval.py', '--tasks=hellaswag,hellaswagg', f'--data_dir={DATA}')
    assert_one_line_error(proc, "unknown task 'hellaswagg'", 'hellaswag, arc_easy, arc_challenge, piqa, winogrande, '
                          'mmlu, gsm8k')


@pytest.mark.parametrize('bad', ['0', '-3', 'abc'])
def test_limit_must_be_a_positive_number(bad):
    assert_one_line_error(run_here('eval.py', f'--limit={bad}', f'--data_dir={DATA}'), '--limit=')


@pytest.mark.parametrize('task,name', [('hellaswag', 'hellaswag_val.jsonl'), ('piqa', 'valid-labels.lst'),
                                       ('mmlu', 'data/test/abstract_algebra_test.csv'), ('winogrande', 'dev.jsonl')])
def test_a_truncated_or_corrupt_data_file_is_one_line_and_nothing_is_damaged(tmp_path, task, name):
    data = tmp_path / 'data'
    shutil.copytree(DATA / task, data / task)
    path = data / task / name
    whole = path.read_bytes()
    cut = whole[:len(whole) // 2 - 7] if task != 'winogrande' else whole.replace(b'"answer": "2"', b'"answer": "3"')
    path.write_bytes(cut)
    (tmp_path / 'eval.json').write_text('earlier results')
    proc = run_here('eval.py', f'--tasks={task}', f'--data_dir={data}', f'--out={tmp_path}/eval.json',
                    '--init_from=gpt2')
    assert_one_line_error(proc, str(data / task), 'delete it to download it again')
    assert path.read_bytes() == cut and (tmp_path / 'eval.json').read_text() == 'earlier results'


# -------------------------------------------------------------------- downloads, from each source's files

def archive_bytes(kind, members):
    buf = io.BytesIO()
    if kind == 'zip':
        with zipfile.ZipFile(buf, 'w') as z:
            for name, data in members.items():
                z.writestr(name, data)
    else:
        with tarfile.open(fileobj=buf, mode='w') as t:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_every_set_downloads_from_its_source_files_once(server, tmp_path, monkeypatch, capsys):
    read = lambda *p: (DATA.joinpath(*p)).read_bytes()  # noqa: E731
    arc = archive_bytes('zip', {'ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-Test.jsonl':
                                read('arc_easy', 'ARC-Easy-Test.jsonl'),
                                'ARC-V1-Feb2018-2/ARC-Challenge/ARC-Challenge-Test.jsonl':
                                read('arc_challenge', 'ARC-Challenge-Test.jsonl'),
                                'ARC-V1-Feb2018-2/ARC_Corpus.txt': b'a corpus nobody reads here'})
    wino = archive_bytes('zip', {'winogrande_1.1/dev.jsonl': read('winogrande', 'dev.jsonl'),
                                 'winogrande_1.1/train_xl.jsonl': b'{}'})
    mmlu = archive_bytes('tar', {f'data/{split}/{p.name}': p.read_bytes() for split in ('dev', 'test', 'val')
                                 for p in sorted((DATA / 'mmlu' / 'data' / split.replace('val', 'test')).glob('*'))})
    routes = {'/hellaswag_val.jsonl': read('hellaswag', 'hellaswag_val.jsonl'), '/ARC-V1-Feb2018.zip': arc,
              '/valid.jsonl': read('piqa', 'valid.jsonl'), '/valid-labels.lst': read('piqa', 'valid-labels.lst'),
              '/winogrande_1.1.zip': wino, '/data.tar': mmlu, '/test.jsonl': read('gsm8k', 'test.jsonl'),
              '/train.jsonl': read('gsm8k', 'train.jsonl')}
    server.routes.update(routes)
    sha = {route: hashlib.sha256(body).hexdigest() for route, body in routes.items()}
    sources = {}  # each source's url onto the server's file of the same name; a checksum where the real one has one
    for task, files in ev.SOURCES.items():
        sources[task] = {name: (server.url + '/' + url.rsplit('/', 1)[1], known and sha['/' + url.rsplit('/', 1)[1]],
                                member) for name, (url, known, member) in files.items()}
    monkeypatch.setattr(ev, 'SOURCES', sources)
    data = tmp_path / 'data'
    for task in ev.TASKS:
        assert ev.read_items(task, data / task) == items(task), task  # what the source's files say, read alike
    assert 'MB' in capsys.readouterr().err  # the downloads' progress
    paths = [p for p, _ in server.requests]
    assert sorted(set(paths)) == sorted(routes) and len(paths) == len(routes)  # each file once: ARC's zip too
    assert not list(data.glob('*.zip')) and not list(data.glob('*.tar'))  # archives unpacked, then deleted
    assert not (data / 'mmlu' / 'data' / 'val').exists()  # only what a task reads
    for task in ev.TASKS:  # all there now: nothing more is fetched
        ev.read_items(task, data / task)
    assert len(server.requests) == len(routes)


def test_a_download_that_fails_its_checksum_is_one_line(server, tmp_path, monkeypatch):
    server.routes['/test.jsonl'] = b'{"question": "tampered", "answer": "#### 1"}\n'
    sources = dict(ev.SOURCES, gsm8k={'test.jsonl': (server.url + '/test.jsonl', '0' * 64, None),
                                      'train.jsonl': (server.url + '/test.jsonl', None, None)})
    monkeypatch.setattr(ev, 'SOURCES', sources)
    with pytest.raises(OSError, match='sha256'):
        ev.read_items('gsm8k', tmp_path / 'gsm8k')
    assert not (tmp_path / 'gsm8k' / 'test.jsonl').exists()


@needs_gpt2_bpe
def test_without_a_shared_context_each_batch_is_one_forward_pass(tiny_gpt2, monkeypatch):
    # FSDP's processes gather weights in every forward pass: train.py's HellaSwag under FSDP (share_context=False)
    # must make as many on every process whatever the data, here one a batch, with the same scores
    model, _, tok, _ = tiny_gpt2
    encoded = [[ev.encode_pair(tok, c, e) for c, e in it['requests']] for it in items('arc_easy', limit=3)]
    shared = ev.score_choices(model, encoded, 'cpu', nullcontext())
    calls, real = [], model.hidden_states
    monkeypatch.setattr(model, 'hidden_states', lambda *a, **k: calls.append(1) or real(*a, **k))
    lockstep = ev.score_choices(model, encoded, 'cpu', nullcontext(), share_context=False)
    assert len(calls) == len(encoded)
    assert [[n for _, n in item] for item in lockstep] == [[n for _, n in item] for item in shared]
    assert [[s for s, _ in item] for item in lockstep] == [pytest.approx([s for s, _ in item], abs=1e-4)
                                                          for item in shared]
