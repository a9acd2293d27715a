"""sample.py as a user runs it: from a checkpoint, streaming, long prompts, bad input."""
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_one_line_error, make_llama_folder, run_here, run_script
from model import GPT, GPTConfig
from weights import save_checkpoint
from tokenizer import ByteTokenizer, chat_style_of


def make_checkpoint(out_dir, spread=1.0):
    """spread: the blocks' matrices times this (an untrained model then does not just repeat one token)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and '.h.' in name:
                p.mul_(spread)
    save_checkpoint(out_dir / 'ckpt.pt', model, 'bytes', {})
    return model


def test_sample_streams_greedy_text_from_checkpoint(tmp_path):
    model = make_checkpoint(tmp_path)
    tok = ByteTokenizer()
    expected = model.generate(torch.tensor([tok.encode('abc')]), 12, temperature=0)[0, 3:].tolist()
    proc = run_script('sample.py', f'--out_dir={tmp_path}', '--start=abc', '--temperature=0',
                      '--max_new_tokens=12', '--num_samples=2')
    assert proc.returncode == 0, proc.stderr
    samples = proc.stdout.split('\n---------------\n')
    assert samples[0] == 'abc' + tok.decode(expected) and samples[1] == samples[0]
    half = run_script('sample.py', f'--out_dir={tmp_path}', '--start=abc', '--temperature=0',
                      '--max_new_tokens=12', '--num_samples=1', '--dtype=float16')
    assert half.returncode == 0 and half.stdout.split('\n---')[0] == samples[0]


def test_long_prompt_is_cropped_to_its_last_tokens_with_a_notice(tmp_path):
    """A 100-byte prompt for a 32-token context: the text sampled after it is the text sampled, with the same seed,
    after its last 32 bytes alone, and not after its first 32."""
    make_checkpoint(tmp_path, spread=4.0)  # an untrained model whose next byte depends on what it reads
    prompt = ''.join(random.Random(0).choices('abcdefghijklmnopqrstuvwxyz ', k=100))
    (tmp_path / 'prompt.txt').write_text(prompt, encoding='utf-8')

    def sample(start):
        return run_here('sample.py', f'--out_dir={tmp_path}', f'--start={start}', '--max_new_tokens=40',
                        '--num_samples=1', '--seed=3')
    cropped, last, first = sample(f'FILE:{tmp_path / "prompt.txt"}'), sample(prompt[-32:]), sample(prompt[:32])
    assert cropped.returncode == 0 and "is 100 tokens, longer than the model's context of 32" in cropped.stderr
    assert cropped.stdout.startswith(prompt) and last.stdout.startswith(prompt[-32:]) and 'notice' not in last.stderr
    assert cropped.stdout[100:] == last.stdout[32:] != first.stdout[32:]


def test_bad_inputs_give_one_line_errors(tmp_path):
    # one through a real interpreter (no traceback reaches the user), the rest in this process
    assert_one_line_error(run_script('sample.py', f'--out_dir={tmp_path}'), 'no checkpoint')
    (tmp_path / 'ckpt.pt').write_bytes(b'PK\x03\x04 not really a zip')
    assert_one_line_error(run_here('sample.py', f'--out_dir={tmp_path}'), 'not a loadable checkpoint')
    make_checkpoint(tmp_path)
    assert_one_line_error(run_here('sample.py', f'--out_dir={tmp_path}', '--start=FILE:nope.txt'), 'nope.txt')
    (tmp_path / 'bin.txt').write_bytes(b'\xff\xfe\x00bad')
    assert_one_line_error(run_here('sample.py', f'--out_dir={tmp_path}', f'--start=FILE:{tmp_path}/bin.txt'),
                          'UTF-8')
    assert_one_line_error(run_here('sample.py', '--temprature=0'), 'did you mean --temperature')
    assert_one_line_error(run_here('sample.py', '--num_samples=two'), '--num_samples')
    assert_one_line_error(run_here('sample.py', f'--init_from={tmp_path}/none'), 'not a GPT-2 size')
    for mode in ('--chat=True', '--serve=8000'):  # a chat template we do not have: stopped before it talks or listens
        assert_one_line_error(run_here('sample.py', f'--out_dir={tmp_path}', mode, '--chat_style=nope'),
                              '--chat_style=nope', 'chatml')


def test_help_lists_keys_with_defaults():
    proc = run_script('sample.py', '--help')
    assert proc.returncode == 0 and '--temperature=0.8' in proc.stdout and "--init_from='resume'" in proc.stdout


def test_sample_from_a_llama_family_folder(tmp_path):
    model, tok = make_llama_folder(tmp_path / 'm', 'llama3')
    expected = model.generate(torch.tensor([tok.encode('Hello there')]), 10, temperature=0)[0].tolist()
    proc = run_script('sample.py', f'--init_from={tmp_path / "m"}', '--start=Hello there', '--temperature=0',
                      '--max_new_tokens=10', '--num_samples=1')
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.split('\n---')[0]
    whole = 'Hello there' + tok.decode(expected[len(tok.encode('Hello there')):])
    # (a character whose bytes the last token leaves incomplete is never printed by the streaming decoder)
    assert whole.startswith(printed) and len(whole) - len(printed) <= 1 and len(printed) > len('Hello there') + 5


def test_chat_keeps_the_cache_across_turns_and_equals_uncached_generation(tmp_path, capsys, monkeypatch):
    import sample
    from tokenizer import format_chat
    model, tok = make_llama_folder(tmp_path / 'm', 'qwen2')
    for key, value in dict(max_new_tokens=12, temperature=0, top_k=0, top_p=1.0, system='Be brief.',
                           chat_context=256).items():
        monkeypatch.setattr(sample, key, value)
    assert chat_style_of(tok) == 'chatml'
    lines = iter(['hello', 'and again?', '/reset', 'hello', '/exit', 'never read'])
    prefilled = []
    real = model.hidden_states
    monkeypatch.setattr(model, 'hidden_states',
                        lambda idx, kv_cache=None: prefilled.append(idx.size(1)) or real(idx, kv_cache))
    replies = sample.chat_loop(model, tok, 'chatml', 'cpu', read=lambda prompt: next(lines))
    out = capsys.readouterr().out
    # turn 2, uncached: the whole conversation rendered and generated from scratch
    turn1 = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'hello'}]
    ids1 = tok.encode(format_chat(turn1, 'chatml'))
    end = tok.encode('<|im_end|>')[0]
    gen1 = model.generate(torch.tensor([ids1]), 12, temperature=0, eos_id=end, use_cache=False)[0, len(ids1):].tolist()
    reply1 = tok.decode(gen1[:gen1.index(end)] if end in gen1 else gen1)
    turn2 = turn1 + [{'role': 'assistant', 'content': reply1}, {'role': 'user', 'content': 'and again?'}]
    ids2 = tok.encode(format_chat(turn2, 'chatml'))
    gen2 = model.generate(torch.tensor([ids2]), 12, temperature=0, eos_id=end, use_cache=False)[0, len(ids2):].tolist()
    reply2 = tok.decode(gen2[:gen2.index(end)] if end in gen2 else gen2)
    assert len(set(gen1)) > 3 and replies == [reply1, reply2, reply1]  # after /reset, the first answer again
    assert reply1 in out and reply2 in out  # streamed as it came
    # the second turn's prefill fed only what the cache lacked, not the whole conversation again
    prefills = [n for n in prefilled if n > 1]
    assert prefills[0] == len(ids1) and prefills[1] < len(ids2) - len(ids1) + 5


def test_chat_with_a_small_context_crops_old_turns_not_the_new_message(tmp_path, capsys, monkeypatch):
    import sample
    model, tok = make_llama_folder(tmp_path / 'm', 'qwen2')
    # our own checkpoints have a context of 128 while max_new_tokens defaults to 200
    for key, value in dict(max_new_tokens=200, temperature=0, top_k=0, top_p=1.0, system='', chat_context=64).items():
        monkeypatch.setattr(sample, key, value)
    lines = iter(['hello there', 'a second question', 'and a third one', '/exit'])
    asked, generate = [], model.generate
    monkeypatch.setattr(model, 'generate',
                        lambda idx, n, **kw: asked.append((idx.size(1), n)) or generate(idx, n, **kw))
    replies = sample.chat_loop(model, tok, 'chatml', 'cpu', read=lambda prompt: next(lines))
    out = capsys.readouterr()
    assert len(replies) == 3 and all(n == 32 and prompt + n <= 64 for prompt, n in asked)  # a reply: half the context
    assert re.search(r'notice: the conversation is longer than the context \(64 tokens.*dropped its \d+ oldest',
                     out.err)
    assert 'message alone is too long' not in out.err


def test_chat_reads_stdin_to_its_end(tmp_path):
    """--chat=True as a user pipes it: two lines on stdin, each answered with the greedy reply to the whole
    conversation so far (computed here without the cache), then end of input ends the chat with exit code 0."""
    from tokenizer import format_chat
    model, tok = make_llama_folder(tmp_path / 'm', 'qwen2')
    proc = subprocess.run([sys.executable, str(ROOT / 'sample.py'), '--device=cpu', '--dtype=float32',
                           f'--init_from={tmp_path / "m"}', '--chat=True', '--temperature=0', '--max_new_tokens=12',
                           '--system=Be brief.'], input='hello\nand again?\n', capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    end = tok.encode('<|im_end|>')[0]
    messages, replies = [{'role': 'system', 'content': 'Be brief.'}], []
    for line in ('hello', 'and again?'):
        messages.append({'role': 'user', 'content': line})
        ids = tok.encode(format_chat(messages, 'chatml'))
        gen = model.generate(torch.tensor([ids]), 12, temperature=0, eos_id=end, use_cache=False)[0, len(ids):].tolist()
        replies.append(tok.decode(gen[:gen.index(end)] if end in gen else gen))
        messages.append({'role': 'assistant', 'content': replies[-1]})
    assert len(set(replies[0])) > 3 and replies[0] != replies[1]
    header, rest = proc.stdout.split('\n', 1)
    assert header.startswith('chat (chatml format, up to 256 tokens)')
    # input() writes its '> ' prompt to stdout when stdin is a pipe; each reply streams, then a new line
    assert rest == ''.join(f'> {r}\n' for r in replies) + '> ', (rest, replies)


def test_compiled_sampling_equals_eager(tmp_path):
    from configurator import compile_available
    if not compile_available('cpu'):
        pytest.skip('torch.compile cannot run on this CPU (no C compiler)')
    model = make_checkpoint(tmp_path, spread=4.0)  # an untrained model that does not repeat one byte
    tok = ByteTokenizer()
    tokens = model.generate(torch.tensor([tok.encode('abc')]), 12, temperature=0)[0, 3:].tolist()
    assert len(set(tokens)) > 6
    proc = subprocess.run([sys.executable, str(ROOT / 'sample.py'), '--device=cpu', '--dtype=float32',
                           f'--out_dir={tmp_path}', '--start=abc', '--temperature=0', '--max_new_tokens=12',
                           '--num_samples=1', '--compile=True'], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'TORCH_LOGS': 'dynamo'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'compiler function inductor' in proc.stderr  # (TORCH_LOGS=dynamo) it did compile, not fall back to eager
    assert proc.stdout.split('\n---')[0] == 'abc' + tok.decode(tokens)
