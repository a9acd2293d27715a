"""model.py: the GPT, Hugging Face parity, weights in/out, KV-cache generation, sampling, LoRA."""
import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import weights
from conftest import FIXTURES, spread_weights
from model import GPT, GPTConfig, KVCache, apply_lora, filter_logits, merge_lora, merged_state_dict, lora_disabled
from weights import (from_pretrained, load_checkpoint, load_safetensors, model_from_checkpoint, save_checkpoint,
                     save_pretrained, save_safetensors)

TINY_HF = FIXTURES / 'tiny-gpt2'


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=32), **kw})).eval()


def varied(**kw):
    """tiny() whose next token depends on the context (conftest.spread_weights)."""
    return spread_weights(tiny(**kw))


def assert_varied(ids, at_least=8):
    assert len(set(ids.flatten().tolist())) >= at_least, ids  # not one token repeated


def test_parameter_counts_match_gpt2():
    assert GPT(GPTConfig()).get_num_params() == 124_439_808           # GPT-2 124M, biases, tied head
    model = GPT(GPTConfig())
    qkv_bias = sum(b.attn.c_attn.bias.numel() for b in model.transformer.h)
    assert model.get_num_params() - qkv_bias == 124_412_160            # the book's count (no qkv bias)


def test_gpt2_initialisation():
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=1000, block_size=64))
    assert model.lm_head.weight is model.transformer.wte.weight
    std_proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std_proj - 0.02 / (2 * 8) ** 0.5) < 0.001
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001
    assert model.transformer.h[0].attn.c_attn.bias.abs().sum() == 0


def test_forward_shapes_and_ignore_index():
    model = tiny()
    idx = torch.randint(0, 96, (2, 10))
    logits, loss = model(idx)
    assert logits.shape == (2, 10, 96) and loss is None
    targets = torch.randint(0, 96, (2, 10))
    _, loss = model(idx, targets)
    masked = targets.clone()
    masked[:, 5:] = -100
    _, loss_masked = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, :5].reshape(-1, 96), targets[:, :5].reshape(-1))
    assert torch.allclose(loss_masked, expected, atol=1e-6) and not torch.allclose(loss, loss_masked)


def test_logits_match_huggingface_fixture():
    """The fixture was saved by transformers' GPT2LMHeadModel (tests/fixtures/make_gpt2_fixture.py)."""
    model = from_pretrained(TINY_HF).eval()
    ids = torch.from_numpy(np.load(TINY_HF / 'input_ids.npy'))
    expected = torch.from_numpy(np.load(TINY_HF / 'expected_logits.npy'))
    with torch.no_grad():
        logits, _ = model(ids)
    assert (logits - expected).abs().max().item() <= 1e-4


def test_greedy_generation_matches_huggingface_generate():
    model = from_pretrained(TINY_HF).eval()
    expected = torch.from_numpy(np.load(TINY_HF / 'expected_greedy.npy'))
    out = model.generate(expected[:, :5], 20, temperature=0)
    assert torch.equal(out, expected)


def hub_style(tensors):
    """The naming of the files on the hub: no 'transformer.' prefix, plus the mask buffers."""
    out = {k.removeprefix('transformer.'): v for k, v in tensors.items()}
    n = 1 + max(int(k.split('.')[1]) for k in out if k.startswith('h.'))
    for i in range(n):
        out[f'h.{i}.attn.bias'] = torch.tril(torch.ones(1, 1, 32, 32))
        out[f'h.{i}.attn.masked_bias'] = torch.tensor(-1e4)
    return out


def test_both_naming_styles_and_a_bare_safetensors_file_load(tmp_path):
    ref = from_pretrained(TINY_HF)
    tensors = load_safetensors(TINY_HF / 'model.safetensors')
    assert any(k.startswith('transformer.') for k in tensors)
    (tmp_path / 'hub').mkdir()
    save_safetensors(hub_style(tensors), tmp_path / 'hub' / 'model.safetensors')
    (tmp_path / 'hub' / 'config.json').write_text((TINY_HF / 'config.json').read_text())
    ids = torch.randint(0, 96, (1, 8))
    for source in (tmp_path / 'hub', tmp_path / 'hub' / 'model.safetensors'):
        assert torch.equal(from_pretrained(source)(ids)[0], ref(ids)[0])


def test_save_pretrained_round_trip_and_layout(tmp_path):
    for bias in (True, False):
        model = tiny(bias=bias)
        save_pretrained(model, tmp_path / str(bias))
        cfg = json.loads((tmp_path / str(bias) / 'config.json').read_text())
        assert (cfg['n_layer'], cfg['n_head'], cfg['n_embd'], cfg['n_positions']) == (2, 4, 32, 32)
        tensors = load_safetensors(tmp_path / str(bias) / 'model.safetensors')
        assert tensors['transformer.h.0.attn.c_attn.weight'].shape == (32, 96)  # Conv1D: (in, out)
        assert 'lm_head.weight' not in tensors and 'transformer.h.1.ln_2.bias' in tensors
        back = from_pretrained(tmp_path / str(bias)).eval()
        ids = torch.randint(0, 96, (2, 12))
        assert torch.allclose(back(ids)[0], model(ids)[0], atol=1e-6)


def test_safetensors_dtypes_round_trip(tmp_path):
    tensors = {'a': torch.randn(3, 4), 'b': torch.randn(5).to(torch.bfloat16), 'c': torch.arange(7),
               'd': torch.randn(2, 2).half(), 'e': torch.tensor(1.5), 'f': torch.zeros(0)}
    save_safetensors(tensors, tmp_path / 'x.safetensors')
    back = load_safetensors(tmp_path / 'x.safetensors')
    assert set(back) == set(tensors)
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k])
    n = int.from_bytes((tmp_path / 'x.safetensors').read_bytes()[:8], 'little')
    assert n % 8 == 0  # data starts aligned


def test_from_pretrained_overrides_and_errors(tmp_path):
    model = from_pretrained(TINY_HF, block_size=16, dropout=0.1)
    assert model.config.block_size == 16 and model.transformer.wpe.weight.shape == (16, 32)
    assert model.transformer.drop.p == 0.1
    with pytest.raises(ValueError, match='longer than the 32 positions'):
        from_pretrained(TINY_HF, block_size=64)
    with pytest.raises(ValueError, match='only override'):
        from_pretrained(TINY_HF, n_layer=3)
    with pytest.raises(FileNotFoundError, match='not a GPT-2 size'):
        from_pretrained(tmp_path / 'nothing')
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": [1, 2]}  ')
    with pytest.raises(ValueError, match='not a valid safetensors'):
        from_pretrained(bad)
    bad.write_bytes(b'')
    with pytest.raises(ValueError, match='not a valid safetensors'):
        from_pretrained(bad)
    tensors = load_safetensors(TINY_HF / 'model.safetensors')
    del tensors['transformer.h.1.mlp.c_fc.weight']
    (tmp_path / 'm').mkdir()
    save_safetensors(tensors, tmp_path / 'm' / 'model.safetensors')
    (tmp_path / 'm' / 'config.json').write_text((TINY_HF / 'config.json').read_text())
    with pytest.raises(ValueError, match='missing: transformer.h.1.mlp.c_fc.weight'):
        from_pretrained(tmp_path / 'm')


def with_header(src, dst, change, cut=0):
    """A copy of the .safetensors file src at dst with change(header) applied to its JSON header (the tensor bytes
    as they were, less the last `cut`): a file that passes every check but the one a test aims at."""
    raw = Path(src).read_bytes()
    n = int.from_bytes(raw[:8], 'little')
    header = json.loads(raw[8:8 + n])
    change(header)
    head = json.dumps(header).encode()
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_bytes(len(head).to_bytes(8, 'little') + head + raw[8 + n:len(raw) - cut])
    shutil.copy(Path(src).parent / 'config.json', Path(dst).parent / 'config.json')
    return header


def last_tensor(header):  # the name of the tensor whose bytes end the file
    return max((k for k in header if k != '__metadata__'), key=lambda k: header[k]['data_offsets'][1])


@pytest.mark.parametrize('family', ['tiny-gpt2', 'tiny-qwen3'])  # read by load_safetensors; by SafetensorsFiles
def test_safetensors_bounds_are_checked_before_a_byte_is_read(tmp_path, family):
    """A well-formed header (valid JSON, known dtypes, list shapes, int offsets) whose offsets point past the end of
    the file, or whose byte range does not hold its shape: refused in one line naming the tensor, never read (an
    mmap'd read would fail later with another message, a file read would fill the weights with what is there)."""
    src = FIXTURES / family / 'model.safetensors'

    def shift_last(header):  # the last tensor moved 64 bytes on: its size still right, its end past the file
        header[last_tensor(header)]['data_offsets'] = [x + 64 for x in header[last_tensor(header)]['data_offsets']]

    def narrow(header):  # one column fewer in the shape, the same byte range: sizes do not match
        name = 'transformer.wte.weight' if family == 'tiny-gpt2' else 'model.embed_tokens.weight'
        header[name]['shape'][1] -= 1
    cases = {'truncated': (lambda header: None, 4), 'shifted': (shift_last, 0), 'narrowed': (narrow, 0)}
    for case, (change, cut) in cases.items():
        header = with_header(src, tmp_path / case / 'model.safetensors', change, cut)
        name = ('transformer.wte.weight' if family == 'tiny-gpt2' else 'model.embed_tokens.weight'
                ) if case == 'narrowed' else last_tensor(header)
        with pytest.raises(ValueError) as error:
            from_pretrained(tmp_path / case)
        assert str(error.value) == (f"{tmp_path / case / 'model.safetensors'} is not a valid safetensors file (tensor "
                                    f"{name} lies outside the file or has the wrong size); re-download or re-save it")
    with_header(src, tmp_path / 'same' / 'model.safetensors', lambda header: None)  # the rewriting itself is sound
    ids = torch.randint(0, 96, (1, 8))
    assert torch.equal(from_pretrained(tmp_path / 'same')(ids)[0], from_pretrained(FIXTURES / family)(ids)[0])


# What transformers' GPT2Config assumes for a key absent from config.json (the export leaves these out: they are
# the defaults, and each is the only value model.py computes)
GPT2_ASSUMED = {'scale_attn_weights': True, 'reorder_and_upcast_attn': False, 'scale_attn_by_inverse_layer_idx': False,
                'add_cross_attention': False, 'pad_token_id': None}
# keys of the fixture's config.json no network or loader here depends on
GPT2_BOOKKEEPING = {'transformers_version', 'initializer_range', 'use_cache', 'summary_activation',
                    'summary_first_dropout', 'summary_proj_to_labels', 'summary_type', 'summary_use_proj', 'dtype'}


def test_gpt2_export_equals_transformers_files(tmp_path):
    """tests/fixtures/tiny-gpt2 is what transformers' GPT2LMHeadModel.save_pretrained wrote: ours writes the same
    tensors (names, dtypes, shapes, values) and a config.json that says the same things."""
    save_pretrained(from_pretrained(TINY_HF), tmp_path)
    ours, theirs = load_safetensors(tmp_path / 'model.safetensors'), load_safetensors(TINY_HF / 'model.safetensors')
    assert sorted(ours) == sorted(theirs)
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype and ours[key].shape == t.shape and torch.equal(ours[key], t), key
    raw = (tmp_path / 'model.safetensors').read_bytes()
    assert json.loads(raw[8:8 + int.from_bytes(raw[:8], 'little')])['__metadata__'] == {'format': 'pt'}
    exported, hf = (json.loads((folder / 'config.json').read_text()) for folder in (tmp_path, TINY_HF))
    for key, value in hf.items():
        if key not in GPT2_BOOKKEEPING:
            assert exported.get(key, GPT2_ASSUMED.get(key, 'absent')) == value, key
    assert set(exported) - set(hf) == {'n_ctx'}  # the hub's older name for n_positions, which it equals
    assert exported['n_ctx'] == hf['n_positions']
    assert str(ours['transformer.wte.weight'].dtype) == f"torch.{hf['dtype']}"  # transformers reads the weights' dtype
    assert weights.gpt2_config(exported, ours, tmp_path) == weights.gpt2_config(hf, theirs, TINY_HF)


def test_padded_vocab_is_never_sampled_or_scored(tmp_path):
    """padded_vocab_size=128 for 96 real tokens: the same model as without padding, whatever
    the 32 extra rows hold; they are cut off before the loss and before sampling."""
    plain, padded = tiny(), tiny(padded_vocab_size=128)
    assert padded.lm_head.weight.shape == (128, 32) and padded.lm_head.weight is padded.transformer.wte.weight
    sd = plain.state_dict()
    with torch.no_grad():
        for name, t in padded.state_dict().items():
            t[:len(sd[name])] = sd[name]
        prompt = torch.randint(0, 96, (3, 5))
        h = padded.hidden_states(prompt)[:, -1].mean(0)
        padded.transformer.wte.weight[96:] = 100 * h / h.norm()  # would win every argmax if it were scored
    idx, targets = torch.randint(0, 96, (2, 10)), torch.randint(0, 96, (2, 10))
    (lp, loss_p), (l0, loss_0) = padded(idx, targets), plain(idx, targets)
    assert lp.shape == (2, 10, 96) and torch.allclose(lp, l0, atol=1e-5) and torch.allclose(loss_p, loss_0, atol=1e-6)
    loss_p.backward()
    loss_0.backward()
    assert padded.lm_head.weight.grad[96:].abs().sum() == 0
    assert torch.allclose(padded.lm_head.weight.grad[:96], plain.lm_head.weight.grad, atol=1e-6)
    assert torch.allclose(padded.transformer.h[0].attn.c_attn.weight.grad,
                          plain.transformer.h[0].attn.c_attn.weight.grad, atol=1e-6)
    assert torch.equal(padded.generate(prompt, 20, temperature=0), plain.generate(prompt, 20, temperature=0))
    torch.manual_seed(5)
    sampled = padded.generate(prompt, 50, temperature=2.0)
    assert sampled.max() < 96
    save_pretrained(padded, tmp_path / 'hf')  # the Hugging Face layout has only the real rows
    assert load_safetensors(tmp_path / 'hf' / 'model.safetensors')['transformer.wte.weight'].shape == (96, 32)
    assert torch.allclose(from_pretrained(tmp_path / 'hf').eval()(idx)[0], l0, atol=1e-5)
    save_checkpoint(tmp_path / 'ckpt.pt', padded, None, {})
    back = model_from_checkpoint(load_checkpoint(tmp_path))
    assert back.config.padded_vocab_size == 128 and torch.equal(back.eval()(idx)[0], lp.detach())


@pytest.mark.parametrize('batch', [1, 3])
def test_kv_cache_equals_no_cache(batch):
    model = varied()
    idx = torch.randint(0, 96, (batch, 7))
    a = model.generate(idx, 25, temperature=0)
    b = model.generate(idx, 25, temperature=0, use_cache=False)
    assert torch.equal(a, b) and a.shape == (batch, 32)
    assert_varied(a[:, 7:])
    for top_k, top_p in ((None, None), (10, None), (None, 0.8), (20, 0.9)):
        torch.manual_seed(123)
        a = model.generate(idx, 25, temperature=1.3, top_k=top_k, top_p=top_p)
        torch.manual_seed(123)
        b = model.generate(idx, 25, temperature=1.3, top_k=top_k, top_p=top_p, use_cache=False)
        assert torch.equal(a, b)
        assert_varied(a[:, 7:])


def test_cached_logits_equal_full_forward():
    model = tiny()
    idx = torch.randint(0, 96, (2, 20))
    full, _ = model(idx)
    cache = KVCache(model.config, 2, 'cpu', torch.float32)
    parts = [model.lm_head(model.hidden_states(idx[:, :8], cache)),       # prefill
             model.lm_head(model.hidden_states(idx[:, 8:13], cache)),     # a chunk after a prefix (masked)
             *[model.lm_head(model.hidden_states(idx[:, t:t + 1], cache)) for t in range(13, 20)]]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_generation_past_block_size_and_eos():
    from test_generate import sliding_window_reference
    model = varied()
    idx = torch.randint(0, 96, (2, 40))   # longer than the context: cropped
    out = model.generate(idx, 70, temperature=0)
    assert out.shape == (2, 110) and torch.equal(out[:, :40], idx)
    assert torch.equal(out[:, 40:], sliding_window_reference(model, list(idx), 40, 70))  # the window slid 6 times
    assert_varied(out[:, 40:])
    # eos: each row stops when it emits it; finished rows are padded with it
    first = model.generate(idx[:, :5], 10, temperature=0)
    row0, row1 = first[0, 5:].tolist(), first[1, 5:].tolist()
    assert_varied(first[:, 5:], at_least=3)
    at = next(i for i in range(2, 10) if row0[i] not in row0[:i] + row1)  # row 0's first, row 1 never
    eos = row0[at]
    out = model.generate(idx[:, :5], 10, temperature=0, eos_id=eos)
    assert (out[0, 6 + at:] == eos).all() and torch.equal(out[0, :6 + at], first[0, :6 + at])
    assert torch.equal(out[1], first[1])  # row 1 never emits it: runs to the end, unchanged
    seen = []
    model.generate(idx[:, :5], 6, temperature=0, on_token=seen.append)
    assert len(seen) == 6 and torch.equal(torch.stack(seen, 1), first[:, 5:11])


def test_filter_logits_keeps_exactly_the_right_tokens():
    probs = torch.tensor([[0.05, 0.40, 0.10, 0.25, 0.20]])
    logits = probs.log()
    kept = lambda out: set(torch.nonzero(out[0] > float('-inf')).flatten().tolist())
    assert kept(filter_logits(logits, top_k=2)) == {1, 3}
    assert kept(filter_logits(logits, top_p=0.39)) == {1}           # 0.40 alone reaches 0.39
    assert kept(filter_logits(logits, top_p=0.5)) == {1, 3}         # 0.40 < 0.5, + 0.25 reaches it
    assert kept(filter_logits(logits, top_p=0.84)) == {1, 3, 4}     # 0.65 < 0.84 <= 0.85
    assert kept(filter_logits(logits, top_p=0.86)) == {1, 3, 4, 2}
    assert kept(filter_logits(logits, top_k=3, top_p=0.5)) == {1, 3}
    assert kept(filter_logits(logits, top_p=1.0)) == {0, 1, 2, 3, 4}
    torch.manual_seed(0)
    model = tiny()
    samples = model.generate(torch.zeros(64, 1, dtype=torch.long), 1, top_k=3)[:, 1]
    allowed = set(torch.topk(model(torch.zeros(1, 1, dtype=torch.long))[0][0, -1], 3).indices.tolist())
    assert set(samples.tolist()) <= allowed and len(set(samples.tolist())) > 1


def test_configure_optimizers_decays_only_matrices():
    model = tiny()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    decay, no_decay = opt.param_groups
    assert decay['weight_decay'] == 0.1 and all(p.dim() >= 2 for p in decay['params'])
    assert no_decay['weight_decay'] == 0.0 and all(p.dim() < 2 for p in no_decay['params'])
    assert sum(p.numel() for g in opt.param_groups for p in g['params']) == model.get_num_params()


def test_lora_starts_unchanged_trains_only_adapters_and_merges():
    model = tiny()
    idx = torch.randint(0, 96, (2, 10))
    before = model(idx)[0].detach()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all('lora_' in n for n in trainable)
    assert len(trainable) == 2 * 3 * 2 + 2 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj x (A, B) x 2 layers
    assert torch.allclose(model(idx)[0], before)  # B = 0: no change yet
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(5):
        loss = model(idx, idx)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for k, v in model.state_dict().items():
        if 'lora_' not in k:
            assert torch.equal(v, frozen[k]), k
    after = model(idx)[0].detach()
    assert not torch.allclose(after, before)
    with lora_disabled(model):
        assert torch.allclose(model(idx)[0], before)
    assert torch.allclose(model(idx)[0], after)  # the adapters are back
    plain = GPT(model.config).eval()
    plain.load_state_dict(merged_state_dict(model))
    assert torch.allclose(plain(idx)[0], after, atol=1e-5)
    merge_lora(model)
    assert not any('lora_' in k for k in model.state_dict())
    assert torch.allclose(model(idx)[0], after, atol=1e-5)


def test_checkpoint_round_trip_and_hostile_files(tmp_path):
    model = tiny()
    save_checkpoint(tmp_path / 'ckpt.pt', model, 'bytes', {})
    assert not (tmp_path / 'ckpt.pt.tmp').exists()
    back = model_from_checkpoint(load_checkpoint(tmp_path))
    ids = torch.randint(0, 96, (1, 5))
    assert torch.equal(back.eval()(ids)[0], model(ids)[0])

    class Evil:
        def __reduce__(self):
            return (print, ('pwned',))
    with open(tmp_path / 'evil.pt', 'wb') as f:
        pickle.dump({'model': Evil(), 'model_args': {}}, f)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no pickle-protocol warning either: one line says it all
        with pytest.raises(ValueError, match='refused unread: it is not a checkpoint of this project') as err:
            load_checkpoint(tmp_path / 'evil.pt')
    assert 'weights_only' not in str(err.value)  # never advise the unsafe way out
    data = (tmp_path / 'ckpt.pt').read_bytes()
    (tmp_path / 'trunc.pt').write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match='not a loadable checkpoint'):
        load_checkpoint(tmp_path / 'trunc.pt')
    torch.save({'weights': 1}, tmp_path / 'other.pt')
    with pytest.raises(ValueError, match='not a checkpoint of this project'):
        load_checkpoint(tmp_path / 'other.pt')
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
        load_checkpoint(tmp_path / 'missing')
