"""sample.py as a user runs it: from a checkpoint, streaming, long prompts, bad input."""
import torch

from conftest import assert_one_line_error, run_script
from model import GPT, GPTConfig, save_checkpoint
from prepare_data import ByteTokenizer


def make_checkpoint(out_dir):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=2, n_head=2, n_embd=32)).eval()
    save_checkpoint({'model': model.state_dict(), 'model_args': vars(model.config).copy(), 'tokenizer': 'bytes'},
                    out_dir / 'ckpt.pt')
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


def test_long_prompt_is_cropped_with_a_notice(tmp_path):
    make_checkpoint(tmp_path)
    (tmp_path / 'prompt.txt').write_text('x' * 100, encoding='utf-8')
    proc = run_script('sample.py', f'--out_dir={tmp_path}', f'--start=FILE:{tmp_path / "prompt.txt"}',
                      '--max_new_tokens=40', '--num_samples=1', '--seed=3')
    assert proc.returncode == 0, proc.stderr
    assert "longer than the model's context of 32" in proc.stderr


def test_bad_inputs_give_one_line_errors(tmp_path):
    assert_one_line_error(run_script('sample.py', f'--out_dir={tmp_path}'), 'no checkpoint')
    (tmp_path / 'ckpt.pt').write_bytes(b'PK\x03\x04 not really a zip')
    assert_one_line_error(run_script('sample.py', f'--out_dir={tmp_path}'), 'not a loadable checkpoint')
    make_checkpoint(tmp_path)
    assert_one_line_error(run_script('sample.py', f'--out_dir={tmp_path}', '--start=FILE:nope.txt'), 'nope.txt')
    (tmp_path / 'bin.txt').write_bytes(b'\xff\xfe\x00bad')
    assert_one_line_error(run_script('sample.py', f'--out_dir={tmp_path}', f'--start=FILE:{tmp_path}/bin.txt'),
                          'UTF-8')
    assert_one_line_error(run_script('sample.py', '--temprature=0'), 'did you mean --temperature')
    assert_one_line_error(run_script('sample.py', '--num_samples=two'), '--num_samples')
    assert_one_line_error(run_script('sample.py', f'--init_from={tmp_path}/none'), 'not a GPT-2 size')


def test_help_lists_keys_with_defaults():
    proc = run_script('sample.py', '--help')
    assert proc.returncode == 0 and '--temperature=0.8' in proc.stdout and "--init_from='resume'" in proc.stdout
