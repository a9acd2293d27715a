"""The Llama family in model.py (Llama 3.2, Qwen2.5, Qwen3, SmolLM2): parity with transformers on
random weights (fixtures made by tests/fixtures/make_llama_fixtures.py), export, hub download,
memory while loading."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import weights
from conftest import FIXTURES, PEAK_RSS, ROOT
from model import GPT, GPTConfig, KVCache, apply_lora, merge_lora
from weights import from_pretrained, save_pretrained

FAMILIES = ['tiny-llama3', 'tiny-qwen2', 'tiny-qwen3', 'tiny-smollm2', 'tiny-llama3-untied-bf16-sharded']


def fixture(name):
    folder = FIXTURES / name
    ids, logits = (torch.from_numpy(np.load(folder / f)) for f in ('input_ids.npy', 'expected_logits.npy'))
    return folder, ids, logits


@pytest.mark.parametrize('name', FAMILIES)
def test_logits_and_greedy_tokens_equal_transformers(name):
    folder, ids, expected = fixture(name)
    model = from_pretrained(str(folder), dtype=torch.float32).eval()
    logits, _ = model(ids)
    assert (logits - expected).abs().max().item() <= 1e-4
    greedy = np.load(folder / 'expected_greedy.npy')
    out = model.generate(ids[:1, :5], 20, temperature=0)
    assert out.tolist() == greedy.tolist()
    assert torch.equal(out, model.generate(ids[:1, :5], 20, temperature=0, use_cache=False))  # cache == no cache


def test_what_each_family_is_made_of():
    cfg = {n: from_pretrained(str(FIXTURES / n)).config for n in FAMILIES}
    assert cfg['tiny-llama3'].rope_scaling['factor'] == 32.0 and cfg['tiny-llama3'].rope_theta == 500000.0
    assert cfg['tiny-llama3'].n_kv_head == 2 and cfg['tiny-llama3'].tie_embeddings
    assert cfg['tiny-qwen2'].qkv_bias and not cfg['tiny-qwen2'].bias and not cfg['tiny-qwen2'].qk_norm
    assert cfg['tiny-qwen3'].qk_norm and cfg['tiny-qwen3'].head_dim == 32 != 64 // 4
    assert not cfg['tiny-llama3-untied-bf16-sharded'].tie_embeddings
    m = from_pretrained(str(FIXTURES / 'tiny-llama3-untied-bf16-sharded'))
    assert m.lm_head.weight.dtype == torch.bfloat16  # the files' dtype is kept unless asked otherwise
    assert m.lm_head.weight.data_ptr() != m.transformer.wte.weight.data_ptr()
    tied = from_pretrained(str(FIXTURES / 'tiny-qwen3'))
    assert tied.lm_head.weight is tied.transformer.wte.weight


def test_both_rope_config_styles_load_the_same_model(tmp_path):
    folder, ids, expected = fixture('tiny-llama3')
    shutil.copytree(folder, tmp_path / 'm')
    shutil.copy(folder / 'config.hub-style.json', tmp_path / 'm' / 'config.json')  # rope_theta + rope_scaling
    assert 'rope_parameters' in json.loads((folder / 'config.json').read_text())  # transformers 5's style
    logits, _ = from_pretrained(str(tmp_path / 'm')).eval()(ids)
    assert (logits - expected).abs().max().item() <= 1e-4


def test_kv_cache_holds_the_shared_heads_only():
    model = from_pretrained(str(FIXTURES / 'tiny-qwen3'))
    cache = KVCache(model.config, 1, 'cpu', torch.float32, length=16)
    # layers; batch, n_kv_head (not n_head=4), positions, head_dim
    assert len(cache.k) == 2 and cache.k[0].shape == (1, 2, 16, 32)


@pytest.mark.parametrize('name', FAMILIES)
def test_export_loads_back_here_and_in_transformers(name, tmp_path):
    folder, ids, expected = fixture(name)
    model = from_pretrained(str(folder), dtype=torch.float32).eval()
    save_pretrained(model, tmp_path / 'out', tokenizer_json='{"version": "1.0"}')
    hf = json.loads((tmp_path / 'out' / 'config.json').read_text())
    src = json.loads((folder / 'config.json').read_text())
    assert hf['model_type'] == src['model_type'] and hf['architectures'] == src['architectures']
    assert (tmp_path / 'out' / 'tokenizer.json').is_file()
    back = from_pretrained(str(tmp_path / 'out')).eval()
    assert torch.equal(back(ids)[0], model(ids)[0])
    try:
        import transformers  # noqa: F401
    except ImportError:
        pytest.skip('transformers is not installed: test_export_equals_transformers_files compares the files instead')
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'out', dtype=torch.float32).eval()
    assert (hf_model(ids).logits - expected).abs().max().item() <= 1e-4


# Keys transformers writes into config.json that neither our loader nor the network depends on; the export
# leaves them out, and the comparison below skips them (and checks that the loader reads none of them).
TRANSFORMERS_BOOKKEEPING = {
    'transformers_version': 'the version that wrote the file',
    'initializer_range': "a new model's init; a loaded one has its weights",
    'use_cache': "generate()'s default",
    'pretraining_tp': "how Meta's training was sharded: 1, and the same math whatever it is",
    'bos_token_id': 'the tokenizer names its special tokens (tokenizer.json)', 'eos_token_id': 'as bos_token_id',
    'pad_token_id': 'as bos_token_id',
    'layer_types': 'all full_attention, which use_sliding_window false already says',
    'max_window_layers': 'as layer_types', 'sliding_window': 'as layer_types',
    'is_llama_config': "SmolLM2's hub extra, ignored by transformers' Llama",
    'rope_interleaved': "SmolLM2's hub extra (false: rotate-half RoPE, the only kind here)",
}
# keys only the export writes: each is what transformers assumes for the family when the key is absent
EXPORT_ONLY = {'head_dim', 'attention_bias', 'mlp_bias', 'use_sliding_window'}


def comparable(hf):
    """A config.json as {key: value} with RoPE in one form (theta, type, scaling) whichever key style the file
    uses (rope_theta + rope_scaling, or rope_parameters), dtype under one name, and the bookkeeping left out."""
    rope = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
    theta = rope.pop('rope_theta', None)
    kind = rope.pop('rope_type', rope.pop('type', 'default'))
    out = {k: v for k, v in hf.items() if k not in TRANSFORMERS_BOOKKEEPING and
           k not in ('rope_theta', 'rope_scaling', 'rope_parameters', 'dtype', 'torch_dtype')}
    out['rope'] = (hf.get('rope_theta', theta), kind, rope)
    out['dtype'] = hf.get('dtype', hf.get('torch_dtype'))
    return out


class Reads(dict):
    """A dict that remembers which keys were asked for."""
    def __init__(self, d):
        super().__init__(d)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


@pytest.mark.parametrize('name', FAMILIES)
def test_export_equals_transformers_files(name, tmp_path):
    """Without transformers: the fixture folders are what transformers' save_pretrained wrote, so ours must
    write the same tensors (names, dtypes, shapes, values) and a config.json that says the same things."""
    folder = FIXTURES / name
    save_pretrained(from_pretrained(str(folder)), tmp_path)  # the files' own dtype (bfloat16 for the sharded one)
    ours = weights.load_safetensors(tmp_path / 'model.safetensors')
    theirs = {}
    for shard in weights.weight_files(folder):
        theirs.update(weights.load_safetensors(shard))
    assert sorted(ours) == sorted(theirs)
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype and ours[key].shape == t.shape and torch.equal(ours[key], t), key
    raw = (tmp_path / 'model.safetensors').read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], 'little')])
    assert header['__metadata__'] == {'format': 'pt'}  # transformers refuses a file without it

    exported = json.loads((tmp_path / 'config.json').read_text())
    styles = [folder / 'config.json'] + sorted(folder.glob('config.hub-style.json'))  # both RoPE key styles
    for path in styles:
        hf = json.loads(path.read_text())
        loader = Reads(hf)
        assert weights.llama_config(loader) == weights.llama_config(exported)
        assert not loader.read & TRANSFORMERS_BOOKKEEPING.keys()
        ours_c, theirs_c = comparable(exported), comparable(hf)
        for key, value in theirs_c.items():
            assert ours_c.get(key, 'absent') == value, (path.name, key)
        assert set(ours_c) - set(theirs_c) <= EXPORT_ONLY
    assert len(styles) == (2 if name == 'tiny-llama3' else 1)


def test_lora_finds_the_llama_projections():
    model = from_pretrained(str(FIXTURES / 'tiny-qwen2'), dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (1, 8))
    before = model(ids)[0]
    apply_lora(model, rank=4, alpha=8)
    # A and B for c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj (the same names as GPT-2's) in each of 2 blocks
    assert sum(1 for n, p in model.named_parameters() if p.requires_grad) == 2 * 4 * 2
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith('lora_B'):
                p.normal_()
    changed = model(ids)[0]
    assert not torch.allclose(before, changed)
    merge_lora(model)
    assert torch.allclose(model(ids)[0], changed, atol=1e-4)


def test_a_llama_shaped_model_from_scratch_trains_and_saves(tmp_path):
    cfg = GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, norm='rmsnorm',
                    pos_emb='rope', mlp='swiglu', mlp_hidden=96, bias=False, tie_embeddings=False, rope_theta=500000.0)
    torch.manual_seed(0)
    model = GPT(cfg)
    assert not hasattr(model.transformer, 'wpe') and model.lm_head.weight is not model.transformer.wte.weight
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), 'cpu')
    x = torch.randint(0, 100, (4, 32))
    losses = []
    for _ in range(30):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 2
    save_pretrained(model, tmp_path / 'm')
    assert json.loads((tmp_path / 'm' / 'config.json').read_text())['model_type'] == 'llama'
    back = from_pretrained(str(tmp_path / 'm'))
    assert torch.equal(back.eval()(x)[0], model.eval()(x)[0])


def serve(server, folder, repo):
    for f in folder.iterdir():
        server.routes[f'/{repo}/resolve/main/{f.name}'] = f.read_bytes()


def test_hub_download_sharded_with_token_then_offline(server, tmp_path, monkeypatch):
    folder, ids, expected = fixture('tiny-llama3-untied-bf16-sharded')
    serve(server, folder, 'org/tiny')
    monkeypatch.setattr(weights, 'HF_ENDPOINT', server.url)
    monkeypatch.setattr(weights, 'CACHE_DIR', tmp_path / 'cache')
    monkeypatch.setenv('HF_TOKEN', 'hf_secret')
    model = from_pretrained('org/tiny', dtype=torch.float32).eval()
    assert (model(ids)[0] - expected).abs().max().item() <= 1e-4
    assert set(server.authorizations) == {'Bearer hf_secret'}
    fetched = {p for p, _ in server.requests}
    assert sum('model-0000' in p for p in fetched) == 3  # the shards the index names
    server.routes.clear()  # offline: the cache is enough, and it holds the same model
    asked = len(server.requests)
    offline = from_pretrained('org/tiny', dtype=torch.float32).eval()
    assert len(server.requests) == asked and torch.equal(offline(ids)[0], model(ids)[0])
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in offline.state_dict().items())


def test_gated_repo_says_what_to_do(server, tmp_path, monkeypatch):
    server.status['/meta-llama/Llama-3.2-1B/resolve/main/config.json'] = 401
    monkeypatch.setattr(weights, 'HF_ENDPOINT', server.url)
    monkeypatch.setattr(weights, 'CACHE_DIR', tmp_path / 'cache')
    monkeypatch.delenv('HF_TOKEN', raising=False)
    with pytest.raises(OSError, match='accept its license on the hub, then set HF_TOKEN'):
        from_pretrained('llama-3.2-1b')


MEASURE = '''
import re, sys, torch
sys.path.insert(0, sys.argv[2])
from weights import empty_model, from_pretrained
from model import GPTConfig
empty_model(GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=8, block_size=8), torch.float32)  # torch's first-use
# setup (~65 MB, whatever the model's size) belongs to the baseline, not to the model
''' + PEAK_RSS + '''
before = peak()
model = from_pretrained(sys.argv[1])
print(before, peak(), sum(p.numel() * p.element_size() for p in model.parameters()))
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='VmHWM in /proc/self/status is Linux')
def test_loading_holds_the_weights_once(big_random_model):
    # conftest's 109 MB bfloat16 Qwen3-like model: the peak while loading stays below 1.5x its bytes
    out = subprocess.run([sys.executable, '-c', MEASURE, str(big_random_model[0]), str(ROOT)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    before, after, size = map(int, out.stdout.split())
    assert size > 100e6 and after - before <= 1.5 * size, (before, after, size)


def test_a_published_models_tokenizer_alone_by_name(server, tmp_path, monkeypatch):
    from tokenizer import get_tokenizer
    server.routes['/org/tiny/resolve/main/config.json'] = (FIXTURES / 'tiny-qwen2' / 'config.json').read_bytes()
    tokenizer_json = FIXTURES / 'tokenizers' / 'qwen2' / 'tokenizer.json'
    server.routes['/org/tiny/resolve/main/tokenizer.json'] = tokenizer_json.read_bytes()
    monkeypatch.setattr(weights, 'HF_ENDPOINT', server.url)
    monkeypatch.setattr(weights, 'CACHE_DIR', tmp_path / 'cache')
    tok = get_tokenizer('org/tiny')
    assert tok.decode(tok.encode('Hello <|im_end|> world')) == 'Hello <|im_end|> world'
    assert not any('safetensors' in p for p, _ in server.requests)  # the tokenizer only, no weights
    # the same folder the model loads from: train.py and the fine-tuning scripts see the same tokenizer name
    assert tok.name == get_tokenizer(str(tmp_path / 'cache' / 'org--tiny')).name


def test_a_single_file_model_loads_offline_once_fetched(server, tmp_path, monkeypatch):
    folder, ids, expected = fixture('tiny-qwen3')  # no model.safetensors.index.json: the hub answers 404 for it
    serve(server, folder, 'org/single')
    monkeypatch.setattr(weights, 'HF_ENDPOINT', server.url)
    monkeypatch.setattr(weights, 'CACHE_DIR', tmp_path / 'cache')
    from_pretrained('org/single')
    asked = len(server.requests)
    model = from_pretrained('org/single').eval()  # complete: not one more request
    assert len(server.requests) == asked and (model(ids)[0] - expected).abs().max().item() <= 1e-4


def test_paths_are_not_hub_ids():
    from weights import is_hub_name
    assert is_hub_name('Qwen/Qwen3-0.6B') and is_hub_name('qwen3-0.6b') and is_hub_name('SmolLM2-135M'.lower())
    for path in ('out/ckpt.pt', 'out-instruct/ckpt.pt', './my/model', 'models/tokenizer.json', '/abs/path'):
        assert not is_hub_name(path), path  # a missing checkpoint says "no checkpoint", not "is gated"


def test_the_same_tokenizer_in_two_folders_is_the_same():
    import train
    assert train.same_tokenizer('qwen3-0.6b-ba2ffe2c1234', 'Qwen--Qwen3-0.6B-ba2ffe2c1234')
    assert not train.same_tokenizer('qwen-ba2ffe2c1234', 'qwen-000000000000')
    assert train.same_tokenizer('bytes', 'bytes') and not train.same_tokenizer('bytes', 'gpt2')


def test_unsupported_rope_scaling_is_named(tmp_path):
    folder, _, _ = fixture('tiny-llama3')
    hf = json.loads((folder / 'config.json').read_text())
    yarn = {**hf, 'rope_parameters': {'rope_type': 'yarn', 'factor': 4.0, 'rope_theta': 500000.0,
                                      'original_max_position_embeddings': 64}}
    with pytest.raises(ValueError, match="RoPE scaling 'yarn' is not supported"):
        weights.llama_config(yarn)
    hub_style = {k: v for k, v in hf.items() if k != 'rope_parameters'}
    with pytest.raises(ValueError, match="'yarn'"):  # the hub's older key, with 'type'
        weights.llama_config({**hub_style, 'rope_theta': 500000.0, 'rope_scaling': {'type': 'yarn', 'factor': 4.0}})
    assert weights.llama_config(hf).rope_scaling['factor'] == 32.0  # (the fixture itself loads)
    # a folder with such a config.json: the scripts stop with that one line
    shutil.copytree(folder, tmp_path / 'm')
    (tmp_path / 'm' / 'config.json').write_text(json.dumps(yarn))
    from conftest import assert_one_line_error, run_script  # sample.py's one case in a new interpreter (else run_here)
    assert_one_line_error(run_script('sample.py', f'--init_from={tmp_path / "m"}', '--max_new_tokens=2',
                                     '--num_samples=1'),
                          "RoPE scaling 'yarn' is not supported")


def test_configs_and_checkpoints_that_do_not_fit_are_one_line_errors(tmp_path):
    """A config.json of a family or feature we do not have, one that disagrees with its weights or lacks a key, a
    checkpoint of ours whose weights are not its model_args': ValueError in one line naming the cause (the scripts
    print it after 'error: '), never a traceback or a model with what happened to be there."""
    from conftest import assert_one_line_error, run_here
    from weights import load_pretrained, save_checkpoint, save_safetensors

    def folder(name, source, change=None, drop=None):
        shutil.copytree(FIXTURES / source, tmp_path / name)
        hf = json.loads((tmp_path / name / 'config.json').read_text())
        (change or (lambda hf: None))(hf)
        (tmp_path / name / 'config.json').write_text(json.dumps(hf))
        if drop:
            tensors = weights.load_safetensors(FIXTURES / source / 'model.safetensors')
            save_safetensors({k: v for k, v in tensors.items() if k != drop}, tmp_path / name / 'model.safetensors')
        return tmp_path / name
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16))
    save_checkpoint(tmp_path / 'ours' / 'ckpt.pt', model, 'bytes', {'n_layer': 2})
    ckpt = torch.load(tmp_path / 'ours' / 'ckpt.pt', weights_only=True)
    ckpt['model_args']['n_layer'] = 3  # a config that is not the weights'
    torch.save(ckpt, tmp_path / 'ours' / 'ckpt.pt')
    cases = {
        folder('mistral', 'tiny-qwen2', lambda hf: hf.update(model_type='mistral')):
            "model_type 'mistral' is not supported (gpt2, llama, qwen2, qwen3, gemma3_text, gemma3)",
        folder('sliding', 'tiny-qwen2', lambda hf: hf.update(use_sliding_window=True)):
            'sliding-window attention (use_sliding_window) is not supported',
        folder('wider', 'tiny-gpt2', lambda hf: hf.update(n_embd=64)):
            'model.safetensors does not fit this model (shape: transformer.wte.weight (96, 32) vs (96, 64)',
        folder('no-n_head', 'tiny-gpt2', lambda hf: hf.pop('n_head')): "config.json lacks 'n_head'",
        folder('deeper', 'tiny-qwen2', lambda hf: hf.update(num_hidden_layers=3)):
            'lacks model.layers.2.input_layernorm.weight; is it a complete qwen2 checkpoint?',
        folder('mlp', 'tiny-qwen2', lambda hf: hf.update(intermediate_size=128)):
            "give 192 rows, the model's transformer.h.0.mlp.c_fc.weight has 256; config.json does not match the "
            "weights",
        folder('no-mlp-size', 'tiny-qwen2', lambda hf: hf.pop('intermediate_size')):
            "config.json lacks 'intermediate_size'; is it a whole qwen2 config.json?",
        folder('no-embedding', 'tiny-qwen2', drop='model.embed_tokens.weight'):
            'lacks model.embed_tokens.weight; is it a complete qwen2 checkpoint?',
        tmp_path / 'ours': 'ours does not fit this model (missing: transformer.h.2.attn.c_attn.bias',
    }
    for path, needle in cases.items():
        with pytest.raises(ValueError) as error:
            load_pretrained(str(path))
        assert needle in str(error.value) and '\n' not in str(error.value), (path.name, str(error.value))
    # and what a script says: that line, after 'error: '
    assert_one_line_error(run_here('sample.py', f'--init_from={tmp_path / "mistral"}', '--max_new_tokens=2'),
                          "model_type 'mistral' is not supported")
    assert_one_line_error(run_here('sample.py', f'--init_from={tmp_path / "ours"}', '--max_new_tokens=2'),
                          'does not fit this model')
