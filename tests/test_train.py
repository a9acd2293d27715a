"""train.py end to end on tiny configs: learning, logging, exact resume, torchrun, interrupts, bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_one_line_error, run_here, run_script
from weights import load_checkpoint
from prepare_data import prepare, write_shard


@pytest.fixture(scope='session')
def data(pydoc_data):  # Python's docs as bytes, prepared once a session (conftest): read only
    return pydoc_data


def tiny(data, out, *extra):
    return [f'--data_dir={data}', f'--out_dir={out}', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
            '--batch_size=8', '--eval_interval=10', '--eval_iters=2', '--log_interval=5', '--sample_tokens=8',
            '--warmup_iters=5', '--learning_rate=3e-3', '--device=cpu', '--dtype=float32', *extra]  # as run_script


def log_rows(out):
    return [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]


def losses(out):
    return [(r['step'], r['train_loss'], r['val_loss']) for r in log_rows(out)]


def train_here(*args):
    """train.py run in this process (conftest.run_here), for its one-line errors. A run that dies inside its loop
    has set its Ctrl-C handler, which must not outlive it here: the per-test time limit interrupts with SIGINT."""
    handler, threads = signal.getsignal(signal.SIGINT), threading.active_count()
    try:
        return run_here('train.py', *args)
    finally:
        signal.signal(signal.SIGINT, handler)
        assert threading.active_count() == threads  # no thread of the run left behind


def test_loss_falls_and_everything_is_logged(data, tmp_path):
    proc = run_script('train.py', *tiny(data, tmp_path / 'out', '--max_iters=60'))
    assert proc.returncode == 0, proc.stderr
    assert 'ms/step' in proc.stdout and 'tok/s' in proc.stdout and 'sample:' in proc.stdout
    rows = log_rows(tmp_path / 'out')
    evals = [r for r in rows if r['val_loss'] is not None]
    assert [r['step'] for r in evals] == [0, 10, 20, 30, 40, 50, 60]
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 1.5  # from ~5.5 (uniform over 257) to well below
    steps = [r for r in rows if r['val_loss'] is None]
    assert set(steps[0]) == {'step', 'train_loss', 'val_loss', 'val_bpb', 'lr', 'tokens_seen', 'ms_per_step',
                             'tokens_per_s', 'mfu'}
    # bytes tokens: one token is one byte (end-of-text counts none), so bits per byte = nats per token / ln 2
    assert evals[-1]['val_bpb'] == pytest.approx(evals[-1]['val_loss'] / np.log(2), rel=0.01)
    assert steps[0]['tokens_seen'] == 5 * 8 * 32 and steps[0]['tokens_per_s'] > 0
    ckpt = load_checkpoint(tmp_path / 'out')
    assert ckpt['iter_num'] == 60 and ckpt['tokenizer'] == 'bytes' and ckpt['config']['max_iters'] == 60
    assert {'optimizer', 'scaler', 'rng', 'data', 'model_args'} <= set(ckpt)
    assert ckpt['model_args']['padded_vocab_size'] == 320 and ckpt['model']['lm_head.weight'].shape[0] == 320
    sample = run_script('sample.py', f'--out_dir={tmp_path / "out"}', '--max_new_tokens=20', '--num_samples=1')
    assert sample.returncode == 0 and len(sample.stdout) > 20


# Muon (the default optimizer): its momentum buffers continue; with --grad_checkpoint the recomputed activations too
@pytest.mark.parametrize('order, extra', [('random', ()), ('one_pass', ('--grad_checkpoint=True',))],
                         ids=['random', 'one_pass-grad_checkpoint'])
def test_resume_continues_exactly(data, tmp_path, order, extra):
    args = ('--dropout=0.1', '--lr_decay_iters=30', '--eval_interval=15', *extra)
    one = run_script('train.py', *tiny(data, tmp_path / 'a', '--max_iters=30', f'--data_order={order}', *args))
    first = run_script('train.py', *tiny(data, tmp_path / 'b', '--max_iters=15', f'--data_order={order}', *args))
    # the run is what the checkpoint says: another --seed (or data order) now must not change its data order
    second = run_script('train.py', *tiny(data, tmp_path / 'b', '--max_iters=30', '--init_from=resume', '--seed=7',
                                          *args))
    assert one.returncode == first.returncode == second.returncode == 0, second.stderr
    a, b = load_checkpoint(tmp_path / 'a'), load_checkpoint(tmp_path / 'b')
    assert a['iter_num'] == b['iter_num'] == 30 and 'resuming the run of --seed=1337' in second.stdout
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    # the log of the resumed run continues where the checkpoint was, without duplicates, with the same losses
    assert losses(tmp_path / 'a') == losses(tmp_path / 'b') and len(losses(tmp_path / 'a')) == 9


@pytest.mark.parametrize('order', ['random', 'one_pass'])
def test_torchrun_two_processes_equal_one_with_accumulation(data, tmp_path, order):
    # AdamW: Muon's bfloat16 Newton-Schulz (on CPUs with native bf16) turns the last-bit difference between an
    # all-reduced mean and an accumulated sum into ~1e-3 differences of the weights; the gradients are the same
    args = tiny(data, tmp_path / 'ddp', '--max_iters=10', '--gradient_accumulation_steps=2', f'--data_order={order}',
                '--optimizer=adamw')
    ddp = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          str(ROOT / 'train.py'), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert '(2 x 1 x 8 x 32)' in ddp.stdout and ddp.stdout.count('step 10:') == 1  # rank 0 alone logs
    single = run_script('train.py', *tiny(data, tmp_path / 'one', '--max_iters=10', '--gradient_accumulation_steps=2',
                                          f'--data_order={order}', '--optimizer=adamw'))
    assert single.returncode == 0, single.stderr
    a, b = load_checkpoint(tmp_path / 'ddp'), load_checkpoint(tmp_path / 'one')
    for k in a['model']:  # the same micro-batches, averaged across processes instead of accumulated
        assert torch.allclose(a['model'][k], b['model'][k], atol=1e-5), k
    # the evaluation batches shared out among the two processes: the same mean as one process alone
    evals = [[r['val_loss'] for r in log_rows(tmp_path / d) if r['val_loss'] is not None] for d in ('ddp', 'one')]
    assert len(evals[0]) == 2 and evals[0] == pytest.approx(evals[1], abs=1e-4)


def test_one_pass_reads_every_window_once_per_epoch(monkeypatch):
    import train
    monkeypatch.setattr(train, 'batch_size', 4)
    T = 8
    shards = [np.arange(8 * 9 + 1), np.arange(1000, 1000 + 8 * 3 + 5)]  # 9 and 3 windows (the tail is too short)
    order = train.OnePass(shards, T, seed=1)
    def epoch(first):  # 12 windows = 3 micro-batches of 4
        xs = [train.get_batch(shards, k, T, 'cpu', order)[0] for k in range(first, first + 3)]
        return [tuple(row.tolist()) for x in xs for row in x]
    windows = {tuple(s[i * T:i * T + T].tolist()) for s in shards for i in range((len(s) - 1) // T)}
    first, second = epoch(0), epoch(3)
    assert len(windows) == 12 and set(first) == set(second) == windows  # each window once per epoch
    assert first != second  # reshuffled each epoch
    x, y = train.get_batch(shards, 4, T, 'cpu', train.OnePass(shards, T, seed=1))  # batch k is a function of k alone
    assert [tuple(r.tolist()) for r in x] == second[4:8] and torch.equal(y[:, :-1], x[:, 1:])
    assert epoch(0) != [tuple(r.tolist()) for k in range(3) for r in
                        train.get_batch(shards, k, T, 'cpu', train.OnePass(shards, T, seed=2))[0]]


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(*args):
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(ROOT / 'train.py'), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_torchrun_resume_restores_each_ranks_generators(data, tmp_path):
    # dropout draws from each rank's own generator: resuming must give every rank back its own state
    args = ('--dropout=0.2', '--lr_decay_iters=10', '--eval_interval=5', '--gradient_accumulation_steps=2')
    whole = torchrun(*tiny(data, tmp_path / 'a', '--max_iters=10', *args))
    first = torchrun(*tiny(data, tmp_path / 'b', '--max_iters=5', *args))
    second = torchrun(*tiny(data, tmp_path / 'b', '--max_iters=10', '--init_from=resume', *args))
    assert whole.returncode == first.returncode == second.returncode == 0, second.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / 'a'), load_checkpoint(tmp_path / 'b')
    assert len(a['rng']['torch']) == 2 and not torch.equal(a['rng']['torch'][0], a['rng']['torch'][1])
    for k in a['model']:
        assert torch.allclose(a['model'][k], b['model'][k], atol=1e-6), k


def test_resume_in_float16_from_a_float32_run(data, tmp_path):
    # a float32 (or bfloat16, or CPU) run saves an empty GradScaler state; float16 then starts a fresh scaler
    assert run_script('train.py', *tiny(data, tmp_path / 'o', '--max_iters=5', '--dtype=float32')).returncode == 0
    assert load_checkpoint(tmp_path / 'o')['scaler'] == {}
    proc = run_script('train.py', *tiny(data, tmp_path / 'o', '--max_iters=10', '--dtype=float16',
                                        '--init_from=resume'))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = load_checkpoint(tmp_path / 'o')
    # a fresh scaler (torch's initial scale, 2**16) that then took 5 float16 steps, none with an inf or a NaN
    assert ckpt['iter_num'] == 10 and ckpt['scaler']['scale'] == 2.0 ** 16 and ckpt['scaler']['_growth_tracker'] == 5


def interrupt(args, tmp_path, after, seconds=120):
    """train.py started with args, sent Ctrl-C (SIGINT) once its stdout has a line starting with `after`; returns
    (exit code, stdout, stderr). Its output goes to files, polled against a deadline: past it the run is killed and
    the test fails with what it printed, instead of waiting on a pipe for ever."""
    out, err = tmp_path / 'stdout.txt', tmp_path / 'stderr.txt'
    with open(out, 'w') as stdout, open(err, 'w') as stderr:
        proc = subprocess.Popen([sys.executable, str(ROOT / 'train.py'), *args], cwd=ROOT, stdout=stdout,
                                stderr=stderr, env={**os.environ, 'PYTHONUNBUFFERED': '1'})  # each line as printed
    try:
        deadline = time.monotonic() + seconds
        while not any(line.startswith(after) for line in out.read_text().splitlines()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no line {after!r} from train.py (exit code {proc.poll()}):\n{out.read_text()[-3000:]}"
                            f"\n{err.read_text()[-3000:]}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"train.py did not stop after Ctrl-C:\n{out.read_text()[-3000:]}\n{err.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out.read_text(), err.read_text()


@pytest.mark.skipif(sys.platform == 'win32', reason='SIGINT delivery to a child differs on Windows')
def test_ctrl_c_saves_exits_cleanly_and_resumes_exactly(data, tmp_path):
    # the schedule set by --lr_decay_iters, not --max_iters: the interrupted run (of 100000) and the run it is
    # compared with (of `end` steps) step at the same learning rates
    args = ('--dropout=0.1', '--lr_decay_iters=200', '--eval_interval=10')
    code, out, err = interrupt(tiny(data, tmp_path / 'b', '--max_iters=100000', *args), tmp_path, after='step 10 |')
    assert code == 130 and 'Traceback' not in err, err
    stopped = load_checkpoint(tmp_path / 'b')['iter_num']  # the step it was at when Ctrl-C came, saved there
    assert stopped >= 10 and f"interrupted: saved step {stopped} to" in out and '--init_from=resume' in out, out
    end = stopped - stopped % 10 + 20  # past an evaluation at a multiple of 10, ending on one
    resumed = run_script('train.py', *tiny(data, tmp_path / 'b', f'--max_iters={end}', '--init_from=resume', *args))
    whole = run_script('train.py', *tiny(data, tmp_path / 'a', f'--max_iters={end}', *args))
    assert resumed.returncode == whole.returncode == 0, resumed.stderr + whole.stderr
    a, b = load_checkpoint(tmp_path / 'a'), load_checkpoint(tmp_path / 'b')
    assert a['iter_num'] == b['iter_num'] == end
    for k in a['model']:  # the same weights as the run that was never interrupted ...
        assert torch.equal(a['model'][k], b['model'][k]), k
    # ... and the same losses at every logged step (the interrupted run also evaluated where it stopped)
    rows = [r for r in losses(tmp_path / 'b') if not (r[0] == stopped and r[2] is not None and stopped % 10)]
    assert rows == losses(tmp_path / 'a') and len(rows) == end // 5 + end // 10 + 1, (rows, losses(tmp_path / 'a'))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    proc = train_here(*tiny(data, tmp_path / 'out', '--max_iters=50', '--learning_rate=1e999', '--grad_clip=0.0'))
    assert_one_line_error(proc, 'not finite', 'last good checkpoint')
    ckpt = load_checkpoint(tmp_path / 'out')
    assert ckpt['iter_num'] == 0 and all(torch.isfinite(v).all() for v in ckpt['model'].values())


def shards(folder, tokens, meta):
    """A data folder of one train and one val shard of these tokens, and this meta.json."""
    folder.mkdir()
    write_shard(folder / 'x_train_000000.bin', tokens)
    write_shard(folder / 'x_val_000000.bin', tokens)
    (folder / 'meta.json').write_text(json.dumps(meta))
    return folder


def an_adamw_checkpoint(eager_float32, out):
    """A copy of the short AdamW run's checkpoint (bytes tokens, 257 ids) in out, to resume from; its mtime."""
    out.mkdir()
    shutil.copy(eager_float32 / 'ckpt.pt', out / 'ckpt.pt')
    return (out / 'ckpt.pt').stat().st_mtime_ns


BYTES = {'tokenizer': 'bytes', 'vocab_size': 257, 'eot_id': 256}


def test_bad_input_gives_one_line_errors(data, tmp_path, eager_float32):
    assert_one_line_error(train_here(*tiny(tmp_path / 'nothing', tmp_path / 'o')), 'no training shards')
    bad = shards(tmp_path / 'bad', np.arange(1000, dtype=np.uint16) % 257, BYTES)
    (bad / 'x_val_000000.bin').write_bytes((bad / 'x_train_000000.bin').read_bytes()[:-7])
    assert_one_line_error(train_here(*tiny(bad, tmp_path / 'o')), 'x_val_000000.bin is corrupt')
    assert_one_line_error(train_here(*tiny(data, tmp_path / 'o', '--batch_size=big')), '--batch_size')
    assert_one_line_error(train_here(*tiny(data, tmp_path / 'o', '--init_from=resume')), 'no checkpoint')
    assert_one_line_error(train_here(*tiny(data, tmp_path / 'o', '--data_order=sorted')), '--data_order=sorted')
    assert_one_line_error(train_here(*tiny(data, tmp_path / 'o', '--block_size=100000')), 'block_size')
    assert_one_line_error(train_here(*tiny(data, tmp_path / 'o', '--learning_rate=1e-4', '--min_lr=4e-4')),
                          '--min_lr=1e-05')
    stamp = an_adamw_checkpoint(eager_float32, tmp_path / 'w')
    assert_one_line_error(train_here(*tiny(data, tmp_path / 'w', '--init_from=resume', '--max_iters=10')),
                          'resume it with --optimizer=adamw')
    assert (tmp_path / 'w' / 'ckpt.pt').stat().st_mtime_ns == stamp
    assert not (tmp_path / 'o' / 'ckpt.pt').exists()


def test_a_vocabulary_mismatch_gives_one_line_errors(tmp_path, eager_float32):
    stamp = an_adamw_checkpoint(eager_float32, tmp_path / 'w')
    resume = ('--init_from=resume', '--optimizer=adamw', '--max_iters=10')
    # a checkpoint resumes only on the tokens it was trained on (here GPT-2's, by their meta.json)
    gpt2 = shards(tmp_path / 'gpt2', np.arange(1000, dtype=np.uint16),
                  {'tokenizer': 'gpt2', 'vocab_size': 50257, 'eot_id': 50256})
    assert_one_line_error(train_here(*tiny(gpt2, tmp_path / 'w', *resume)),
                          'ckpt.pt was trained on bytes tokens but', 'holds gpt2 tokens')
    # the same tokenizer with more ids than the model has rows for (a meta.json counting added tokens)
    more = shards(tmp_path / 'more', np.arange(1000, dtype=np.uint16) % 257, {**BYTES, 'vocab_size': 300})
    assert_one_line_error(train_here(*tiny(more, tmp_path / 'w', *resume)),
                          'holds bytes tokens (300 ids) but the model knows 257')
    assert (tmp_path / 'w' / 'ckpt.pt').stat().st_mtime_ns == stamp and not (tmp_path / 'w' / 'log.jsonl').exists()


def test_no_arguments_prepares_the_default_data_first(tmp_path):
    proc = run_script('train.py', '--max_iters=2', '--eval_iters=1', '--n_layer=1', '--n_embd=32', '--n_head=2',
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / 'data' / 'pydoc_bpe2048' / 'tokenizer.json').exists() and (tmp_path / 'out' / 'ckpt.pt').exists()
    ckpt = load_checkpoint(tmp_path / 'out')
    assert ckpt['model_args']['vocab_size'] == 2048 and ckpt['config']['optimizer'] == 'muon'
    proc = run_script('train.py', '--data_dir=data/pydoc', '--max_iters=1', '--eval_iters=1', '--n_layer=1',
                      '--n_embd=32', '--n_head=2', '--out_dir=bytes', cwd=tmp_path)  # the other data made on first use
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(tmp_path / 'bytes')['model_args']['vocab_size'] == 257  # bytes + end-of-text


class PrefersA(torch.nn.Module):
    """A stand-in model whose next token is always most likely 'a' (byte 97)."""
    config = type('C', (), {'block_size': 64, 'vocab_size': 257})()

    def hidden_states(self, idx, kv_cache=None):
        return torch.zeros(*idx.shape, 1)

    def new_kv_cache(self, *args):  # its own cache: what it predicts never depends on what came before
        return self

    def repeat_rows(self, repeats):
        return self

    def lm_head(self, states):
        logits = torch.zeros(*states.shape[:-1], 257)
        logits[..., 97] = 5.0
        return logits


def test_hellaswag_scoring_picks_the_most_likely_ending():
    import importlib
    from contextlib import nullcontext
    from tokenizer import ByteTokenizer
    train = importlib.import_module('train')
    examples = [{'llmc': ('x', ['aaaa', 'bbbb', 'cccc', 'dddd']), 'label': 0},
                {'llmc': ('yy', ['bbbb', 'cccc', 'aaa', 'dddd']), 'label': 2},
                {'llmc': ('z', ['aaaa', 'bbbb', 'cccc', 'dddd']), 'label': 3},
                {'llmc': ('w', ['a', 'aaaaaaaa', 'bb', 'cc']), 'label': 1}]
    # the third example's label is wrong on purpose; in the fourth the mean per token picks the long ending of a's,
    # where the sum would pick the short one
    assert train.hellaswag_accuracy(PrefersA(), examples, ByteTokenizer(), 'cpu', nullcontext()) == 3 / 4
    # under torchrun each rank scores every world_size-th example; padding slots are run but never counted
    assert train.my_share(3, 0, 2) == [0, 2] and train.my_share(3, 1, 2) == [1, None]
    shares = [train.hellaswag_accuracy(PrefersA(), examples, ByteTokenizer(), 'cpu', nullcontext(), rank, 2)
              for rank in (0, 1)]
    assert train.hellaswag_accuracy(PrefersA(), examples[:3], ByteTokenizer(), 'cpu', nullcontext(), 1, 2) == 1 / 3
    assert shares == [1 / 4, 2 / 4]  # rank 0: example 0 right, 2 wrong; rank 1: examples 1 and 3 right


def test_hellaswag_during_training_from_a_local_copy(data, tmp_path, server, monkeypatch):
    import importlib
    evaluation = importlib.import_module('eval')
    rows = [{'ctx': f'The {w} is', 'ctx_a': f'The {w} is', 'ctx_b': '', 'activity_label': 'x', 'label': i % 4,
             'endings': [' red.', ' blue.', ' a dog.', ' seven.']}
            for i, w in enumerate(['sky', 'sea', 'cat', 'car', 'sun'])]
    server.routes['/hellaswag_val.jsonl'] = '\n'.join(json.dumps(r) for r in rows).encode()
    monkeypatch.setitem(evaluation.SOURCES, 'hellaswag', {'hellaswag_val.jsonl': (server.url + '/hellaswag_val.jsonl',
                                                                                   None, None)})
    assert len(evaluation.read_items('hellaswag', tmp_path / 'hs')) == 5  # downloaded and parsed
    proc = run_script('train.py', *tiny(data, tmp_path / 'out', '--max_iters=10', '--eval_hellaswag=True',
                                        f'--hellaswag_dir={tmp_path}/hs', '--hellaswag_limit=4'))
    assert proc.returncode == 0, proc.stderr
    assert 'HellaSwag acc_norm' in proc.stdout and 'of 4' in proc.stdout
    assert 'hellaswag' in log_rows(tmp_path / 'out')[-1]


def test_torchrun_fsdp_equals_one_process_and_its_checkpoint_loads(data, tmp_path):
    # every run's schedule decays to step 12, so that the 10-step run resumed to 12 is the 12-step run
    args = tiny(data, tmp_path / 'fsdp', '--lr_decay_iters=12', '--optimizer=adamw', '--max_iters=10',
                '--gradient_accumulation_steps=2', '--ddp=fsdp')  # (Muon needs whole matrices: --ddp=ddp)
    run = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          str(ROOT / 'train.py'), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'sample:' in run.stdout and run.stdout.count('step 10:') == 1
    single = run_script('train.py', *tiny(data, tmp_path / 'one', '--lr_decay_iters=12', '--optimizer=adamw',
                                          '--max_iters=10', '--gradient_accumulation_steps=2'))
    assert single.returncode == 0, single.stderr
    a, b = load_checkpoint(tmp_path / 'fsdp'), load_checkpoint(tmp_path / 'one')
    assert set(a['model']) == set(b['model'])
    for k in a['model']:  # sharded weights, gathered whole into the checkpoint
        assert torch.allclose(a['model'][k], b['model'][k], atol=1e-5), k
    resumed = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                              str(ROOT / 'train.py'), *args[:-3], '--max_iters=12', '--gradient_accumulation_steps=2',
                              '--ddp=fsdp', '--init_from=resume'], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(tmp_path / 'fsdp')['iter_num'] == 12
    # the same FSDP run uninterrupted: the sharded optimizer state came back whole, so the weights and the
    # logged losses are those of the run that never stopped
    whole = torchrun(*tiny(data, tmp_path / 'whole', '--lr_decay_iters=12', '--optimizer=adamw', '--max_iters=12',
                           '--gradient_accumulation_steps=2', '--ddp=fsdp'))
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / 'fsdp'), load_checkpoint(tmp_path / 'whole')
    assert a['iter_num'] == b['iter_num'] == 12
    for k in a['model']:
        assert torch.allclose(a['model'][k], b['model'][k], rtol=0, atol=1e-6), \
            (k, (a['model'][k] - b['model'][k]).abs().max())
    losses = [[(r['step'], r['train_loss'], r['val_loss']) for r in log_rows(tmp_path / d)] for d in ('fsdp', 'whole')]
    assert [r[0] for r in losses[0]] == [0, 5, 10, 10, 12] == [r[0] for r in losses[1]]
    for x, y in zip(*losses):
        assert x == pytest.approx(y, abs=1e-6), (x, y)


def test_continue_a_llama_family_model_on_its_own_tokens_and_eval_only(pydoc_data, tmp_path):
    from conftest import make_llama_folder
    make_llama_folder(tmp_path / 'qwen', 'qwen2', spread=1.0)
    data = prepare('verdict', input=str(ROOT.parent / 'shared' / 'data' / 'the-verdict.txt'),
                   tokenizer=str(tmp_path / 'qwen'), data_dir=tmp_path / 'data', quiet=True) \
        if (ROOT.parent / 'shared' / 'data' / 'the-verdict.txt').is_file() else \
        prepare('pydoc', tokenizer=str(tmp_path / 'qwen'), data_dir=tmp_path / 'data', quiet=True)
    # the same tokens the model's tokenizer makes; eval_only writes nothing
    before = run_script('train.py', *tiny(data, tmp_path / 'o', f'--init_from={tmp_path / "qwen"}', '--eval_only=True'))
    assert before.returncode == 0, before.stderr
    assert 'bits per byte' in before.stdout and not (tmp_path / 'o').exists()
    proc = run_script('train.py', *tiny(data, tmp_path / 'o', f'--init_from={tmp_path / "qwen"}', '--max_iters=20'))
    assert proc.returncode == 0, proc.stderr
    evals = [r for r in log_rows(tmp_path / 'o') if r['val_loss'] is not None]
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 0.5
    ckpt = load_checkpoint(tmp_path / 'o')
    assert ckpt['model_args']['pos_emb'] == 'rope' and ckpt['tokenizer']['name'].startswith('qwen-')
    after = run_script('train.py', *tiny(data, tmp_path / 'o', '--init_from=resume', '--eval_only=True'))
    loss = lambda out: float(out.split('val loss ')[1].split(',')[0])  # noqa: E731
    assert loss(after.stdout) < loss(before.stdout) - 0.5
    # a model continues only on its own tokens
    assert_one_line_error(train_here(*tiny(pydoc_data, tmp_path / 'x', f'--init_from={tmp_path / "qwen"}')),
                          'continues on its own tokens')  # (bytes)


def test_a_llama_shaped_model_from_scratch_with_the_config_file(data, tmp_path):
    proc = run_script('train.py', 'config/train_llama_style.py',
                      *tiny(data, tmp_path / 'o', '--max_iters=30', '--n_kv_head=1'))
    assert proc.returncode == 0, proc.stderr
    args = load_checkpoint(tmp_path / 'o')['model_args']
    assert (args['norm'], args['pos_emb'], args['mlp'], args['n_kv_head']) == ('rmsnorm', 'rope', 'swiglu', 1)
    evals = [r for r in log_rows(tmp_path / 'o') if r['val_loss'] is not None]
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 1.0


def test_the_3090_config_reads_20_tokens_per_parameter_with_the_stacked_interventions():
    import train
    from configurator import configure
    from model import GPT, GPTConfig
    g = dict(vars(train))
    configure(g, [str(ROOT / 'config' / 'train_gpt2_3090.py')])
    with torch.device('meta'):  # shapes only
        model = GPT(GPTConfig(n_layer=g['n_layer'], n_head=g['n_head'], n_embd=g['n_embd'], block_size=g['block_size'],
                              bias=g['bias'], vocab_size=50257, padded_vocab_size=50304,
                              tie_embeddings=g['tie_embeddings']))
    params = sum(p.numel() for p in model.parameters())
    assert 162e6 < params < 164e6  # GPT-2 small with its own head: the reader's 163M
    tokens = g['max_iters'] * g['batch_size'] * g['block_size'] * g['gradient_accumulation_steps']
    assert tokens == pytest.approx(20 * params, rel=0.01)
    assert g['warmup_iters'] == pytest.approx(0.05 * g['max_iters'], rel=0.01)
    assert g['min_lr'] == pytest.approx(0.1 * g['learning_rate'])
    assert (g['dropout'], g['weight_decay'], g['grad_clip'], g['learning_rate']) == (0.0, 0.01, 1.0, 1.4e-3)


@pytest.mark.parametrize('name', sorted(p.name for p in (ROOT / 'config').glob('*.py')
                                        if p.name.startswith(('train_', 'speedrun_', 'book_pretrain'))))
def test_every_training_config_reads(name):
    import train
    from configurator import configure
    g = dict(vars(train))
    configure(g, [str(ROOT / 'config' / name)])  # an unknown key or a wrong type would exit
    assert g['max_iters'] > 0 and g['n_embd'] % g['n_head'] == 0


def test_the_speedrun_config_learns_with_muon(data, tmp_path):
    proc = run_script('train.py', 'config/speedrun_shakespeare_cpu.py', f'--data_dir={data}', f'--out_dir={tmp_path}',
                      '--max_iters=40', '--eval_interval=40', '--warmup_iters=5')
    assert proc.returncode == 0, proc.stderr
    evals = [r['val_loss'] for r in log_rows(tmp_path) if r['val_loss'] is not None]
    assert len(evals) == 2 and evals[1] < evals[0] - 2.0  # from ~5.5 (uniform over 257 bytes)
    assert load_checkpoint(tmp_path)['config']['optimizer'] == 'muon'


def test_get_lr_warms_up_then_follows_the_cosine_to_min_lr(monkeypatch):
    import train
    for key, value in dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110, lr_decay_iters=0,
                           decay_lr=True).items():
        monkeypatch.setattr(train, key, value)
    # warmup: lr * (it + 1) / (warmup_iters + 1), so that step 0 does not stand still
    assert train.get_lr(0) == pytest.approx(1e-3 / 11, rel=1e-12)
    assert train.get_lr(4) == pytest.approx(5e-3 / 11, rel=1e-12)
    assert train.get_lr(9) == pytest.approx(1e-2 / 11, rel=1e-12)
    # cosine from the peak at the end of warmup to min_lr at max_iters (lr_decay_iters=0), then min_lr
    assert train.get_lr(10) == pytest.approx(1e-3, rel=1e-12)
    assert train.get_lr(35) == pytest.approx(1e-4 + 0.5 * (1 + np.cos(np.pi / 4)) * 9e-4, rel=1e-12)
    assert train.get_lr(60) == pytest.approx(5.5e-4, rel=1e-12)  # half way: the mean of the two
    assert train.get_lr(85) == pytest.approx(1e-4 + 0.5 * (1 - np.cos(np.pi / 4)) * 9e-4, rel=1e-12)
    assert train.get_lr(110) == train.get_lr(111) == train.get_lr(10**6) == 1e-4
    monkeypatch.setattr(train, 'lr_decay_iters', 50)  # the decay ends at lr_decay_iters instead
    assert train.get_lr(30) == pytest.approx(5.5e-4, rel=1e-12) and train.get_lr(50) == train.get_lr(80) == 1e-4
    monkeypatch.setattr(train, 'decay_lr', False)  # a constant learning rate, warmup included
    assert [train.get_lr(it) for it in (0, 5, 10, 60, 110, 10**6)] == [1e-3] * 6


def test_ms_per_step_leaves_out_evaluations_and_the_first_step(monkeypatch):
    import train
    now = [100.0]
    monkeypatch.setattr(train.time, 'time', lambda: now[0])
    monkeypatch.setattr(train, 'log_interval', 5)

    def run(timer, steps, seconds):  # steps (first, last) taking `seconds` each
        for step in range(steps[0], steps[1] + 1):
            now[0] += seconds(step)
            timer.step_done(step)

    def evaluation(timer, seconds):
        with timer.paused():
            now[0] += seconds

    timer = train.StepTimer(0)
    evaluation(timer, 50)
    run(timer, (1, 5), lambda step: 10 if step == 1 else 1)  # the first step compiles: not counted
    assert timer.lap(5) == 1.0
    evaluation(timer, 36)
    run(timer, (6, 10), lambda step: 2)
    assert timer.lap(10) == 2.0  # the evaluation at step 5 is not step time
    timer = train.StepTimer(4)  # a run resumed at step 4 logs after its first step: that one counts
    run(timer, (5, 5), lambda step: 7)
    assert timer.lap(5) == 7.0
    timer = train.StepTimer(7)  # resumed at step 7: step 8 warms up, steps 9 and 10 are timed
    run(timer, (8, 10), lambda step: 9 if step == 8 else 3)
    assert timer.lap(10) == 3.0


SHORT = ('--max_iters=8', '--optimizer=adamw', '--log_interval=2', '--eval_interval=4')  # evaluations and samples
STEPS = [0, 2, 4, 4, 6, 8, 8]  # the logged rows' steps: training losses every 2, evaluations every 4


@pytest.fixture(scope='module')
def eager_float32(data, tmp_path_factory):
    """A short float32 run without compile: what the bfloat16 and the compiled runs are measured against (and the
    AdamW checkpoint the error tests resume)."""
    out = tmp_path_factory.mktemp('eager') / 'out'
    proc = run_script('train.py', *tiny(data, out, *SHORT))
    assert proc.returncode == 0, proc.stderr
    return out


def test_bfloat16_autocast_trains_like_float32(data, tmp_path, eager_float32):
    proc = run_script('train.py', *tiny(data, tmp_path, *SHORT, '--dtype=bfloat16'))
    assert proc.returncode == 0, proc.stderr
    assert '| cpu bfloat16 |' in proc.stdout
    bf16, fp32 = losses(tmp_path), losses(eager_float32)
    assert [r[0] for r in bf16] == [r[0] for r in fp32] == STEPS
    assert all(np.isfinite(x) for r in bf16 for x in r[1:] if x is not None)
    assert bf16[-1][2] < bf16[0][2] - 0.4  # learning: ~5.40 -> ~4.9 in 8 steps
    for x, y in zip(bf16, fp32):  # measured: within 1.8e-4 of float32 at every row (loss and softmax in float32)
        assert x == pytest.approx(y, abs=1e-3), (x, y)
    assert bf16 != fp32  # ... but not equal: the matmuls did run in bfloat16
    assert load_checkpoint(tmp_path)['model']['lm_head.weight'].dtype == torch.float32  # autocast keeps float32 weights


def test_compiled_training_equals_eager_and_compiles_once(data, tmp_path, eager_float32):
    from configurator import compile_available
    if not compile_available('cpu'):
        pytest.skip('torch.compile cannot run on this CPU (no C compiler)')
    proc = subprocess.run([sys.executable, str(ROOT / 'train.py'), *tiny(data, tmp_path, *SHORT, '--compile=True')],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'TORCH_LOGS': 'dynamo,recompiles'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'compiler function inductor' in proc.stderr  # (TORCH_LOGS=dynamo) it did compile, not fall back to eager
    # compiled once: the evaluations and samples between its steps recompile nothing (TORCH_LOGS=recompiles)
    recompiles = [line for line in proc.stderr.splitlines() if 'Recompiling function' in line]
    assert proc.stdout.count('sample:') == 3 and not recompiles, recompiles
    compiled, eager = losses(tmp_path), losses(eager_float32)
    assert [r[0] for r in compiled] == [r[0] for r in eager] == STEPS
    for x, y in zip(compiled, eager):  # measured: within ~1e-6
        assert x == pytest.approx(y, abs=1e-4), (x, y)
    a, b = load_checkpoint(tmp_path), load_checkpoint(eager_float32)
    assert set(a['model']) == set(b['model'])  # (no torch.compile _orig_mod. prefix)
    for k in a['model']:
        assert torch.allclose(a['model'][k], b['model'][k], atol=1e-4), k


def test_bad_setup_gives_one_line_errors(data, tmp_path, monkeypatch):
    # Muon orthogonalizes whole matrices: not with FSDP's shards (one process under torchrun's variables). In a new
    # interpreter, as a user runs it, so that no traceback reaches the user: train.py's one error line run so (it
    # joins a process group, which must not outlive it here); the others run in this process
    env = {**os.environ, 'RANK': '0', 'LOCAL_RANK': '0', 'WORLD_SIZE': '1', 'MASTER_ADDR': '127.0.0.1',
           'MASTER_PORT': str(free_port())}
    proc = subprocess.run([sys.executable, str(ROOT / 'train.py'), *tiny(data, tmp_path / 'o', '--ddp=fsdp',
                                                                          '--optimizer=muon', '--max_iters=2')],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert_one_line_error(proc, '--optimizer=muon', '--ddp=fsdp')
    assert_one_line_error(train_here(*tiny(data, tmp_path / 'o', '--pad_vocab=0', '--max_iters=2')), '--pad_vocab=0')
    # a torchrun process beyond the machine's GPUs (here: a local rank of 64 on a machine with fewer GPUs)
    for key, value in dict(RANK='0', LOCAL_RANK='64', WORLD_SIZE='1').items():
        monkeypatch.setenv(key, value)
    assert_one_line_error(train_here(*tiny(data, tmp_path / 'o', '--device=cuda', '--max_iters=2')),
                          'torchrun started process 64', '--nproc_per_node')
    # the check itself, with two GPUs mocked: local rank 2 is one process too many
    import configurator
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    for key, value in dict(RANK='2', LOCAL_RANK='2', WORLD_SIZE='3').items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit, match=r'^error: torchrun started process 2 of this machine but only 2 GPU\(s\)'):
        configurator.init_distributed('auto')
    assert not (tmp_path / 'o').exists()

