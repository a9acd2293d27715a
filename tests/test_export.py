"""export.py: GGUF files read back with ggml's own reader (the gguf package), its tokenizer rebuilt in the tokenizers
library, llama.cpp's RoPE convention checked in the math, the Hugging Face folder read by transformers, and the
errors. (llama.cpp itself, too slow to build here, ran in a session: RESULTS.md.)"""
import json
import subprocess
import sys

import jinja2
import numpy as np
import pytest
import torch

from conftest import FIXTURES, PEAK_RSS, ROOT, assert_one_line_error, run_here, spread_weights
import export
from model import GPT, GPTConfig, rope_frequencies
from tokenizer import PROMPT_STYLES, format_chat, get_tokenizer
from weights import save_checkpoint

gguf = pytest.importorskip('gguf')  # tests/requirements.txt installs it (under CI a skip fails)
TEXTS = ["def foo(x):\n    return x ** 2  # comment\n\n\nclass Bar:\n        pass\n",
         "windows\r\nline ends\r\n\r\n  and\ttabs\t\t, runs of spaces:     five,          ten   \n   \n",
         "Numbers: 1 12 123 1234 12345 3.14159 1,000,000; x2 = y**10 +99999999. I'm sure they'll say it's fine",
         "Unicode: Café naïve 你好，世界 😀👍🏽 Россия", "before<|endoftext|>after <|im_end|>\n"]
CONVERSATION = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'What is 2+2?\nSay it.'},
                {'role': 'assistant', 'content': '4'}, {'role': 'user', 'content': 'And 3 + 3?'}]
FAMILIES = {  # name: (tokenizer, GPTConfig fields, chat style)
    'gpt2': ('bpe', dict(padded_vocab_size=704), 'alpaca'),
    'llama': ('llama3', dict(rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position_embeddings=32), rope_theta=500000.0,
                             tie_embeddings=False), 'llama3'),
    'qwen2': ('qwen2', dict(qkv_bias=True, rope_theta=1e6), 'chatml'),
    'qwen3': ('qwen2', dict(qk_norm=True, head_dim=32, rope_theta=1e6), 'chatml'),
}
LLAMA_PARTS = dict(n_kv_head=2, norm='rmsnorm', pos_emb='rope', mlp='swiglu', mlp_hidden=96, bias=False)


def tokenizer_spec(name):
    if name in ('gpt2', 'bytes'):
        return name
    return {'name': name, 'json': (FIXTURES / 'tokenizers' / name / 'tokenizer.json').read_text(encoding='utf-8')}


def checkpoint(folder, family, prompt_style=None, **fields):
    """A random model of the family with a fixture tokenizer, saved as train.py / finetune_instruct.py save one."""
    tokenizer, extra, _ = FAMILIES[family]
    tok = get_tokenizer(tokenizer_spec(tokenizer))
    parts = {} if family == 'gpt2' else LLAMA_PARTS
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=64,
                          **{**parts, **extra, **fields})).eval()
    spread_weights(model, 4.0)
    save_checkpoint(folder / 'ckpt.pt', model, tok.spec, {}, prompt_style=prompt_style)
    return model, tok


def export_to(tmp_path, family, type='f32', suffix='.gguf', **fields):
    model, tok = checkpoint(tmp_path / 'ckpt', family, FAMILIES[family][2], **fields)
    to = tmp_path / f'{family}-{type}{suffix}'
    proc = run_here('export.py', f'--out_dir={tmp_path / "ckpt"}', f'--to={to}', f'--type={type}')
    assert proc.returncode == 0, proc.stderr
    return model, tok, to


def field(reader, key):
    return reader.fields[key].contents()


# -------------------------------------------------------------------- GGUF

def expected_tensors(model, family):
    """Our weights under llama.cpp's names, mapped here independently of export.py (q and k in the pair layout
    are checked by test_llama_cpp_rotary_layout_gives_our_attention_scores instead)."""
    c, sd = model.config, model.state_dict()
    out = {'token_embd.weight': sd['transformer.wte.weight'][:c.vocab_size],
           'output_norm.weight': sd['transformer.ln_f.weight']}
    if not c.tie_embeddings:
        out['output.weight'] = sd['lm_head.weight'][:c.vocab_size]
    for i in range(c.n_layer):
        ours = lambda name: sd[f'transformer.h.{i}.{name}']  # noqa: E731
        if family == 'gpt2':
            out.update({f'blk.{i}.attn_qkv.weight': ours('attn.c_attn.weight'),
                        f'blk.{i}.attn_norm.weight': ours('ln_1.weight'),
                        f'blk.{i}.ffn_up.weight': ours('mlp.c_fc.weight'),
                        f'blk.{i}.ffn_down.bias': ours('mlp.c_proj.bias')})
            continue
        v_rows = c.n_kv_head * c.head_dim
        out.update({f'blk.{i}.attn_v.weight': ours('attn.c_attn.weight')[-v_rows:],
                    f'blk.{i}.ffn_gate.weight': ours('mlp.c_fc.weight')[:c.mlp_hidden],
                    f'blk.{i}.ffn_up.weight': ours('mlp.c_fc.weight')[c.mlp_hidden:],
                    f'blk.{i}.ffn_down.weight': ours('mlp.c_proj.weight'),
                    f'blk.{i}.ffn_norm.weight': ours('ln_2.weight')})
        if c.qk_norm:
            out[f'blk.{i}.attn_k_norm.weight'] = ours('attn.k_norm.weight')
        if c.qkv_bias:
            out[f'blk.{i}.attn_v.bias'] = ours('attn.c_attn.bias')[-v_rows:]
    return out


def read_tensor(t):
    """A GGUF tensor as float32 in our (rows, columns) shape, whatever its storage."""
    values = gguf.quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(list(reversed(t.shape.tolist())))


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('type', ['f32', 'f16', 'bf16', 'q8_0'])
def test_gguf_holds_every_weight_as_ours(tmp_path, family, type):
    model, tok, path = export_to(tmp_path, family, type)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    expected = expected_tensors(model, family)
    assert set(expected) <= set(tensors)
    storage = {'f32': torch.float32, 'f16': torch.float16, 'bf16': torch.bfloat16}
    for name, ours in expected.items():
        t, got = tensors[name], read_tensor(tensors[name])
        assert got.shape == ours.shape, name
        if ours.dim() == 1 or type == 'f32':  # norms and biases: float32 always
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(got, ours), name
        elif type in storage:
            assert torch.equal(got, ours.to(storage[type]).float()), name
        elif ours.size(1) % 32 == 0:  # q8_0: byte for byte what ggml's reference quantizer makes
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
            reference = gguf.quants.quantize(ours.numpy(), gguf.GGMLQuantizationType.Q8_0)
            assert np.array_equal(t.data, reference), name
            assert (got - ours).abs().max() <= ours.abs().max() / 127, name
        else:  # a row that is no whole number of blocks (96 wide here): float16, as llama.cpp's converter does
            assert t.tensor_type == gguf.GGMLQuantizationType.F16 and torch.equal(got, ours.half().float()), name
    assert field(reader, 'general.file_type') == export.FILE_TYPES[type]
    if family == 'gpt2':  # llama.cpp's gpt2 wants every bias: zeros where ours has none (bias=True here: ours)
        assert len(tensors) == 2 + 2 + 12 * model.config.n_layer


def test_q8_0_is_byte_for_byte_ggmls():
    # halves (x / d = 0.5, 1.5, -2.5: C's roundf goes away from zero, numpy's round to even), an all-zero block,
    # and random blocks at many scales
    halves = torch.tensor([127.0, 0.5, 1.5, -2.5, 3.5, -0.5] + [0.0] * 26)
    rows = torch.cat([halves, torch.zeros(32), torch.randn(32 * 62) * torch.logspace(-3, 3, 32 * 62)]).view(4, -1)
    reference = gguf.quants.quantize(rows.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert export.q8_0(rows) == reference.tobytes()


@pytest.mark.parametrize('family', FAMILIES)
def test_gguf_metadata_and_chat_template(tmp_path, family):
    model, tok, path = export_to(tmp_path, family)
    c, reader = model.config, gguf.GGUFReader(path)
    arch = field(reader, 'general.architecture')
    assert arch == {'gpt2': 'gpt2', 'llama': 'llama', 'qwen2': 'qwen2', 'qwen3': 'qwen3'}[family]
    assert (field(reader, f'{arch}.block_count'), field(reader, f'{arch}.embedding_length'),
            field(reader, f'{arch}.attention.head_count'), field(reader, f'{arch}.context_length'),
            field(reader, f'{arch}.feed_forward_length')) == (2, 64, 4, 64, c.mlp_hidden)
    if family != 'gpt2':
        assert field(reader, f'{arch}.attention.head_count_kv') == 2
        assert field(reader, f'{arch}.rope.freq_base') == pytest.approx(c.rope_theta)
        assert field(reader, f'{arch}.rope.dimension_count') == c.head_dim
    style = FAMILIES[family][2]
    assert field(reader, 'tokenizer.ggml.pre') == {'gpt2': 'llama-bpe', 'llama': 'llama-bpe', 'qwen2': 'qwen2',
                                                  'qwen3': 'qwen2'}[family]
    assert field(reader, 'tokenizer.ggml.add_bos_token') is False  # llama-bpe would add one: ours never saw it
    assert field(reader, 'tokenizer.ggml.eos_token_id') == tok.eot_id
    end_of_turn = {'alpaca': '<|endoftext|>', 'llama3': '<|eot_id|>', 'chatml': '<|im_end|>'}[style]
    assert field(reader, 'tokenizer.ggml.eot_token_id') == tok.encode(end_of_turn)[0]
    # the padded rows (gpt2: 704) are cut back to the vocabulary
    embedding = next(t for t in reader.tensors if t.name == 'token_embd.weight')
    assert len(field(reader, 'tokenizer.ggml.tokens')) == embedding.shape[1] == tok.vocab_size
    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
        field(reader, 'tokenizer.chat_template'))  # as transformers and llama.cpp render it
    for messages in (CONVERSATION, CONVERSATION[1:2], []):
        assert template.render(messages=messages, add_generation_prompt=True) == format_chat(messages, style)
    modelfile = path.with_suffix('.Modelfile').read_text()
    assert modelfile.startswith(f'FROM ./{path.name}\nTEMPLATE """') and f'PARAMETER stop "{end_of_turn}"' in modelfile


@pytest.mark.parametrize('style', PROMPT_STYLES)
def test_every_chat_format_as_a_jinja_template(style):
    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(export.jinja_template(style))
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:2], CONVERSATION[:1], []):
        assert template.render(messages=messages, add_generation_prompt=True) == format_chat(messages, style)
        assert format_chat(messages, style).startswith(template.render(messages=messages))


def rebuilt_tokenizer(reader):
    """The GGUF's tokens, types and merges as a tokenizers-library BPE, split by the pre-tokenizer its
    tokenizer.ggml.pre names: what llama.cpp's BPE does with them."""
    from tokenizers import Tokenizer
    tokens, types = field(reader, 'tokenizer.ggml.tokens'), field(reader, 'tokenizer.ggml.token_type')
    pre = dict(export.LLAMA_CPP_PRE)[field(reader, 'tokenizer.ggml.pre')]
    config = {'version': '1.0', 'normalizer': None, 'pre_tokenizer': pre,
              'added_tokens': [{'id': i, 'content': t, 'special': True, 'normalized': False, 'single_word': False,
                                'lstrip': False, 'rstrip': False} for i, (t, kind) in enumerate(zip(tokens, types))
                               if kind == export.TOKEN_CONTROL],
              'decoder': {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True, 'use_regex': False},
              'model': {'type': 'BPE', 'vocab': {t: i for i, (t, kind) in enumerate(zip(tokens, types))
                                                 if kind != export.TOKEN_UNUSED},
                        'merges': field(reader, 'tokenizer.ggml.merges'), 'byte_fallback': False}}
    return Tokenizer.from_str(json.dumps(config))


@pytest.mark.parametrize('tokenizer', ['gpt2', 'bytes', 'bpe', 'llama3', 'qwen2', 'smollm2'])
def test_gguf_tokens_and_merges_give_our_ids(tmp_path, tokenizer):
    tok = get_tokenizer(tokenizer_spec(tokenizer))
    save_checkpoint(tmp_path / 'ckpt.pt', GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2,
                                                         n_embd=32)), tok.spec, {})
    proc = run_here('export.py', f'--out_dir={tmp_path}', f'--to={tmp_path / "t.gguf"}', '--chat_style=alpaca')
    assert proc.returncode == 0, proc.stderr
    reader = gguf.GGUFReader(tmp_path / 't.gguf')
    rebuilt = rebuilt_tokenizer(reader)
    eot = tok.decode([tok.eot_id])
    for text in TEXTS:
        text = text.replace('<|endoftext|>', eot)
        assert rebuilt.encode(text, add_special_tokens=False).ids == tok.encode(text), (tokenizer, text)
    if tokenizer == 'gpt2':  # GPT-2's own 50,000 merges, recovered from tiktoken's ranks
        assert len(field(reader, 'tokenizer.ggml.merges')) == 50000


def rotate_halves(x, angle):  # ours and Hugging Face's: pair (i, i + hs/2)
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = angle.cos(), angle.sin()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def rotate_pairs(x, angle):  # llama.cpp's llama (rope type NORM): pair (2i, 2i + 1)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


@pytest.mark.parametrize('family', ['llama', 'qwen3'])
def test_llama_cpp_rotary_layout_gives_our_attention_scores(tmp_path, family):
    model, tok, path = export_to(tmp_path, family)
    c, tensors = model.config, {t.name: t for t in gguf.GGUFReader(path).tensors}
    rotate = rotate_pairs if family == 'llama' else rotate_halves  # qwen2/qwen3 rotate halves (rope type NEOX)
    q_rows, k_rows = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    w = model.state_dict()['transformer.h.0.attn.c_attn.weight']
    x = torch.randn(2, c.n_embd)  # two tokens, at positions 3 and 17
    angles = torch.tensor([[3.0], [17.0]]) * rope_frequencies(c)  # (2, hs/2): llama.cpp divides by rope_freqs too
    scores = []
    for wq, wk, turn in [(w[:q_rows], w[q_rows:q_rows + k_rows], rotate_halves),
                         (read_tensor(tensors['blk.0.attn_q.weight']), read_tensor(tensors['blk.0.attn_k.weight']),
                          rotate)]:
        q = turn((x @ wq.T).view(2, c.n_head, c.head_dim), angles[:, None])
        k = turn((x @ wk.T).view(2, c.n_kv_head, c.head_dim), angles[:, None])
        scores.append(torch.einsum('hd,gd->hg', q[1], k[0]))  # token 17's queries x token 3's keys
    torch.testing.assert_close(scores[1], scores[0])


# -------------------------------------------------------------------- the Hugging Face folder

@pytest.mark.parametrize('family', ['gpt2', 'llama', 'qwen3'])
def test_folder_gives_our_chat_text_ids_and_logits_in_transformers(tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok, folder = export_to(tmp_path, family, suffix='')
    style = FAMILIES[family][2]
    hf_tok = AutoTokenizer.from_pretrained(folder)
    for messages in (CONVERSATION, CONVERSATION[1:2]):
        text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == format_chat(messages, style)
        assert hf_tok(text, add_special_tokens=False)['input_ids'] == tok.encode(text)
    end = json.loads((folder / 'generation_config.json').read_text())['eos_token_id']
    assert tok.eot_id in end and hf_tok.convert_tokens_to_ids(hf_tok.eos_token) in end
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([tok.encode(TEXTS[0])[:32]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0][..., :model.config.vocab_size], atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------- bad input, memory

def test_bad_input_gets_one_line_and_writes_nothing(tmp_path):
    checkpoint(tmp_path / 'ckpt', 'qwen2')
    gguf_path = tmp_path / 'x.gguf'
    for args, needle in [(['--type=q4_0'], 'q8_0'), ([f'--to={tmp_path}/missing/x.gguf'], 'does not exist'),
                         (['--to='], '--to'), (['--chat_style=vicuna'], 'chatml'), (['--name=My-Phi3'], 'Phi-3')]:
        assert_one_line_error(run_here('export.py', f'--out_dir={tmp_path / "ckpt"}', f'--to={gguf_path}', *args),
                              needle)
    # a model no GGUF architecture holds (learned positions with RMSNorm), in either format
    mixed = GPT(GPTConfig(block_size=16, vocab_size=257, n_layer=1, n_head=2, n_embd=32, norm='rmsnorm'))
    save_checkpoint(tmp_path / 'mixed' / 'ckpt.pt', mixed, 'bytes', {})
    for to in (gguf_path, tmp_path / 'hf'):
        assert_one_line_error(run_here('export.py', f'--out_dir={tmp_path / "mixed"}', f'--to={to}'), 'GPT-2')
    gemma = FIXTURES / 'tiny-gemma3-270m'  # no GGUF here (its folder is the way to llama.cpp)
    assert_one_line_error(run_here('export.py', f'--init_from={gemma}', f'--to={gguf_path}'), 'Gemma 3')
    # a tokenizer whose split llama.cpp has no twin of; a tokenizer with more ids than the model has rows
    spec = tokenizer_spec('bpe')
    spec['json'] = spec['json'].replace(json.dumps(r"\p{N}{1,3}")[1:-1], json.dumps(r"\p{N}{1,2}")[1:-1])
    save_checkpoint(tmp_path / 'odd' / 'ckpt.pt', GPT(GPTConfig(block_size=16, vocab_size=656, n_layer=1, n_head=2,
                                                                n_embd=32)), spec, {})
    assert_one_line_error(run_here('export.py', f'--out_dir={tmp_path / "odd"}', f'--to={gguf_path}'), 'pre-tokenizer')
    small = GPT(GPTConfig(block_size=16, vocab_size=257, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / 'small' / 'ckpt.pt', small, 'gpt2', {})
    assert_one_line_error(run_here('export.py', f'--out_dir={tmp_path / "small"}', f'--to={gguf_path}'), 'tokenizer')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt', 'mixed', 'odd', 'small']  # nothing written


MEASURE = '''
import re, sys, time
sys.path.insert(0, sys.argv[2])
''' + PEAK_RSS + '''
import runpy
import torch
from weights import empty_model
from model import GPTConfig
empty_model(GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=8, block_size=8), torch.float32)  # torch's setup
before, t0 = peak(), time.time()
sys.argv = [sys.argv[2] + '/export.py', '--init_from=' + sys.argv[1], '--to=' + sys.argv[3], '--type=' + sys.argv[4]]
runpy.run_path(sys.argv[0], run_name='__main__')
print(before, peak(), time.time() - t0)
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='VmHWM in /proc/self/status is Linux')
def test_export_is_quick_and_holds_the_model_about_once(big_random_model, tmp_path):
    # conftest's 109 MB bfloat16 Qwen3-like model: every width a multiple of 32, as Qwen3-0.6B's
    size, folder = big_random_model[1], tmp_path / 'm'
    folder.mkdir()  # the model's files, linked, with a tokenizer beside them
    for file in big_random_model[0].iterdir():
        (folder / file.name).symlink_to(file)
    (folder / 'tokenizer.json').write_text(tokenizer_spec('qwen2')['json'], encoding='utf-8')
    sizes = {}
    for type in ('f16', 'q8_0'):
        to = tmp_path / f'm-{type}.gguf'
        out = subprocess.run([sys.executable, '-c', MEASURE, str(folder), str(ROOT), str(to), type],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        before, after, seconds = map(float, out.stdout.split()[-3:])
        assert after - before <= 1.5 * size and seconds < 60, (before, after, size, seconds)
        sizes[type] = to.stat().st_size
    assert sizes['q8_0'] <= 0.55 * sizes['f16'], sizes
