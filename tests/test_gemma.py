"""Gemma 3 (270M, 1B) in model.py: parity with transformers' Gemma3ForCausalLM on random weights in both shapes
(fixtures made by tests/fixtures/make_gemma_fixtures.py), past the sliding window and with left padding; the KV
cache's ring for the sliding layers; export; loading by name; the one-line errors."""
import json
import shutil

import numpy as np
import pytest
import torch

import weights
from conftest import FIXTURES, assert_one_line_error, run_here
from model import GPT, GPTConfig, KVCache, apply_lora, generate_batch, merge_lora
from weights import from_pretrained, save_pretrained

SHAPES = ['tiny-gemma3-270m', 'tiny-gemma3-1b']


def fixture(name, *files):
    return [torch.from_numpy(np.load(FIXTURES / name / f)) for f in files]


def load(name='tiny-gemma3-270m'):
    return from_pretrained(str(FIXTURES / name), dtype=torch.float32).eval()


@pytest.mark.parametrize('name', SHAPES)
def test_logits_past_the_window_and_greedy_tokens_equal_transformers(name):
    ids, expected, greedy = fixture(name, 'input_ids.npy', 'expected_logits.npy', 'expected_greedy.npy')
    model = load(name)
    assert ids.size(1) > 2 * model.config.sliding_window  # the window binds
    assert (model(ids)[0] - expected).abs().max().item() <= 1e-4
    out = model.generate(ids[:1, :10], 20, temperature=0)  # the prompt fits the window; the decoding passes it
    assert out.tolist() == greedy.tolist()
    assert torch.equal(out, model.generate(ids[:1, :10], 20, temperature=0, use_cache=False))
    assert torch.equal(out, model.generate(ids[:1, :10], 20, temperature=0, decode_step=model.decode_step))
    long = model.generate(ids[:1], 6, temperature=0)  # a prompt three windows long, prefilled at once
    assert torch.equal(long, model.generate(ids[:1], 6, temperature=0, use_cache=False))


def test_each_field_is_read():
    ids, expected = fixture('tiny-gemma3-1b', 'input_ids.npy', 'expected_logits.npy')
    model = load('tiny-gemma3-1b')
    cfg = model.config
    assert cfg.layer_types[5] == 'full_attention' and cfg.layer_types.count('full_attention') == 1
    assert (cfg.sliding_window, cfg.rope_theta, cfg.rope_local_theta) == (10, 1e6, 1e4)
    assert (cfg.norm, cfg.mlp, cfg.n_kv_head, cfg.query_pre_attn_scalar) == ('rmsnorm_plus_one', 'geglu', 1, 24)
    assert cfg.sandwich_norm and cfg.scale_embeddings and cfg.qk_norm and cfg.tie_embeddings
    for field, value in dict(sliding_window=0, rope_local_theta=0.0, sandwich_norm=False, scale_embeddings=False,
                             query_pre_attn_scalar=0.0, norm='rmsnorm', mlp='swiglu').items():
        changed = GPT(GPTConfig(**{**cfg.__dict__, field: value})).eval()
        changed.load_state_dict(model.state_dict(), strict=False)
        assert (changed(ids)[0] - expected).abs().max().item() > 1e-3, field


def test_hub_style_config_loads_the_same_model(tmp_path):
    ids, expected = fixture('tiny-gemma3-270m', 'input_ids.npy', 'expected_logits.npy')
    shutil.copytree(FIXTURES / 'tiny-gemma3-270m', tmp_path / 'm')
    shutil.copy(tmp_path / 'm' / 'config.hub-style.json', tmp_path / 'm' / 'config.json')
    hub = json.loads((tmp_path / 'm' / 'config.json').read_text())
    assert 'layer_types' not in hub and hub['rope_local_base_freq'] == 10000.0
    assert (from_pretrained(str(tmp_path / 'm'), dtype=torch.float32).eval()(ids)[0] - expected).abs().max() <= 1e-4


def test_left_padding_logits_and_batched_greedy_equal_transformers():
    padded, expected, greedy = fixture('tiny-gemma3-270m', 'padded_ids.npy', 'expected_padded_logits.npy',
                                       'expected_padded_greedy.npy')
    model, pad = load(), torch.tensor([0, 5])
    cache = KVCache(model.config, 2, 'cpu', torch.float32, padding=pad)
    logits = torch.cat([model.lm_head(model.hidden_states(padded[:, a:b], cache)) for a, b in ((0, 9), (9, 10),
                                                                                              (10, 24))], dim=1)
    logits[1, :5] = 0  # what the padding positions predict is nobody's business
    assert (logits - expected).abs().max().item() <= 1e-4
    out = model.generate(padded[:, :14], 20, temperature=0, padding=pad)
    assert out.tolist() == greedy.tolist()
    assert torch.equal(out, model.generate(padded[:, :14], 20, temperature=0, padding=pad,
                                           decode_step=model.decode_step))
    end = next(i for i in range(320) if i not in greedy)  # an end-of-text token the rows never reach
    rows = generate_batch(model, [padded[0, :14].tolist(), padded[1, 5:14].tolist()], end_id=end, max_new_tokens=20)
    assert rows == [greedy[0, 14:].tolist(), greedy[1, 14:].tolist()]


def test_the_cache_keeps_a_sliding_layers_window_only():
    model = load()
    cache = model.new_kv_cache(1, 128, torch.device('cpu'))
    sizes = [k.size(2) for k in cache.k]
    assert sizes == [8, 8, 8, 8, 8, 128] and [v.size(2) for v in cache.v] == sizes
    assert KVCache(model.config, 1, 'cpu', torch.float32, length=6).k[0].size(2) == 6  # a window longer than the cache
    # a chat that goes back further than one token (the ring has overwritten what the window needs) starts again
    ids = fixture('tiny-gemma3-270m', 'input_ids.npy')[0][:1]
    model.generate(ids, 1, temperature=0, kv_cache=cache)
    cache.truncate(cache.filled - 1)
    assert cache.filled == 23
    cache.truncate(12)
    assert cache.filled == 0
    assert torch.allclose(model.next_logits(ids[:, :13], cache), model(ids[:, :13])[0][:, -1], atol=1e-5)


def test_the_window_slides_past_block_size_and_compiles_once():
    model = load()
    model.crop_block_size(32)
    ids = fixture('tiny-gemma3-270m', 'input_ids.npy')[0][:1]
    eager = model.generate(ids, 40, temperature=0)  # 64 tokens through a 32-slot cache: it slides
    assert torch.equal(eager, model.generate(ids, 40, temperature=0, decode_step=model.decode_step))
    from configurator import compile_available, compile_decoding
    if not compile_available('cpu'):
        pytest.skip('torch.compile needs a C compiler here')
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(eager, model.generate(ids, 40, temperature=0, decode_step=compile_decoding(model, True,
                                                                                                      'cpu')))


def test_lora_int8_and_int4_keep_working():
    from quantize import cast_and_quantize
    ids, expected = fixture('tiny-gemma3-270m', 'input_ids.npy', 'expected_logits.npy')
    model = load()
    apply_lora(model, rank=4, alpha=8)
    assert sum(p.requires_grad for p in model.parameters()) == 6 * 4 * 2
    for n, p in model.named_parameters():
        if n.endswith('lora_B'):
            torch.nn.init.normal_(p, std=0.1)
    changed = model(ids)[0]
    assert (changed - expected).abs().max() > 1e-2
    assert torch.allclose(merge_lora(model)(ids)[0], changed, atol=1e-4)
    for scheme in ('int8', 'int4'):
        q = cast_and_quantize(load(), scheme, 'cpu', 'bfloat16')
        out = q(ids)[0].float()
        assert (out - expected).abs().mean() < 0.2 * expected.std(), scheme
        assert q.generate(ids[:1, :10], 20, temperature=0).shape == (1, 30)


@pytest.mark.parametrize('name', SHAPES)
def test_export_round_trip_through_transformers(name, tmp_path):
    ids, expected = fixture(name, 'input_ids.npy', 'expected_logits.npy')
    model = from_pretrained(str(FIXTURES / name)).eval()  # bfloat16, as the files hold it
    save_pretrained(model, tmp_path / 'ours')
    ours = weights.load_safetensors(tmp_path / 'ours' / 'model.safetensors')
    theirs = weights.load_safetensors(FIXTURES / name / 'model.safetensors')
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], t) for k, t in theirs.items())
    back = from_pretrained(str(tmp_path / 'ours')).eval()
    assert torch.equal(back(ids)[0], model(ids)[0])
    exported = json.loads((tmp_path / 'ours' / 'config.json').read_text())
    assert weights.llama_config(exported) == weights.llama_config(json.loads((FIXTURES / name / 'config.json')
                                                                             .read_text()))
    transformers = pytest.importorskip('transformers')
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'ours', dtype=torch.float32).eval()
    assert type(hf).__name__ == 'Gemma3ForCausalLM'
    assert (hf(ids).logits - expected).abs().max().item() <= 1e-4
    hf.to(torch.bfloat16).save_pretrained(tmp_path / 'theirs')  # ours -> transformers -> ours: the same model
    again = from_pretrained(str(tmp_path / 'theirs')).eval()
    assert (again(ids)[0] - model(ids)[0]).abs().max().item() == 0.0


def test_a_multimodal_checkpoints_text_model_loads_without_its_vision_tower(tmp_path, capsys):
    ids, expected = fixture('tiny-gemma3-270m', 'input_ids.npy', 'expected_logits.npy')
    text = json.loads((FIXTURES / 'tiny-gemma3-270m' / 'config.json').read_text())
    tensors = weights.load_safetensors(FIXTURES / 'tiny-gemma3-270m' / 'model.safetensors')
    for prefix in ('language_model.model.', 'model.language_model.'):  # the hub's naming, transformers 5's
        folder = tmp_path / prefix
        folder.mkdir()
        renamed = {prefix + k.removeprefix('model.'): t for k, t in tensors.items()}
        renamed['vision_tower.vision_model.embeddings.patch_embedding.weight'] = torch.zeros(4, 3, 2, 2)
        weights.save_safetensors(renamed, folder / 'model.safetensors')
        (folder / 'config.json').write_text(json.dumps({'model_type': 'gemma3', 'architectures': [
            'Gemma3ForConditionalGeneration'], 'text_config': text, 'vision_config': {'model_type': 'siglip'}}))
        model = from_pretrained(str(folder), dtype=torch.float32).eval()
        assert (model(ids)[0] - expected).abs().max().item() <= 1e-4
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f'{prefix}: a multimodal Gemma 3; loading its text model, skipping its vision tower']


def test_by_name_downloaded_with_the_token_and_gated_without(server, tmp_path, monkeypatch):
    for f in [*(FIXTURES / 'tiny-gemma3-270m').iterdir(), FIXTURES / 'tokenizers' / 'gemma3' / 'tokenizer.json']:
        server.routes[f'/google/gemma-3-270m-it/resolve/main/{f.name}'] = f.read_bytes()
    server.status['/google/gemma-3-1b-pt/resolve/main/config.json'] = 401
    monkeypatch.setattr(weights, 'HF_ENDPOINT', server.url)
    monkeypatch.setattr(weights, 'CACHE_DIR', tmp_path / 'cache')
    monkeypatch.setenv('HF_TOKEN', 'hf_secret')
    ids, expected = fixture('tiny-gemma3-270m', 'input_ids.npy', 'expected_logits.npy')
    assert (from_pretrained('gemma-3-270m-it', dtype=torch.float32).eval()(ids)[0] - expected).abs().max() <= 1e-4
    assert set(server.authorizations) == {'Bearer hf_secret'}
    from tokenizer import get_tokenizer
    assert get_tokenizer('gemma-3-270m-it').encode('<start_of_turn>user') == get_tokenizer(
        FIXTURES / 'tokenizers' / 'gemma3').encode('<start_of_turn>user')
    monkeypatch.delenv('HF_TOKEN')
    with pytest.raises(OSError, match='google/gemma-3-1b-pt is gated: accept its license on the hub, then set HF_TOK'):
        from_pretrained('gemma-3-1b')


def test_bad_gemma_configs_are_one_line_errors(tmp_path):
    def folder(name, **change):
        shutil.copytree(FIXTURES / 'tiny-gemma3-270m', tmp_path / name)
        hf = json.loads((tmp_path / name / 'config.json').read_text())
        (tmp_path / name / 'config.json').write_text(json.dumps({**hf, **change}))
        return tmp_path / name
    layers = ['sliding_attention'] * 5 + ['chunked_attention']
    cases = {folder('chunked', layer_types=layers): "layer_types must list full_attention or sliding_attention for "
                                                    "each of the 6 layers, not 'chunked_attention'",
             folder('short', layer_types=layers[:3]): 'for each of the 6 layers',
             folder('softcap', final_logit_softcapping=30.0): 'final_logit_softcapping is not supported',
             folder('bias', attention_bias=True): 'attention_bias is not supported'}
    for path, needle in cases.items():
        assert_one_line_error(run_here('sample.py', f'--init_from={path}', '--max_new_tokens=2'), needle)


def make_gemma_folder(folder):
    """A random Gemma-3-shaped model (2 sliding layers, then a global one) with the Gemma-style fixture tokenizer, saved
    in the Hugging Face layout."""
    from conftest import spread_weights
    from tokenizer import get_tokenizer
    tokenizer_json = (FIXTURES / 'tokenizers' / 'gemma3' / 'tokenizer.json').read_text(encoding='utf-8')
    tok = get_tokenizer({'name': 'gemma3', 'json': tokenizer_json})
    torch.manual_seed(0)
    cfg = load('tiny-gemma3-270m').config
    model = GPT(GPTConfig(**{**cfg.__dict__, 'vocab_size': tok.vocab_size, 'n_layer': 3, 'block_size': 256,
                             'layer_types': ['sliding_attention', 'sliding_attention', 'full_attention']})).eval()
    spread_weights(model, 4.0)
    save_pretrained(model, folder, tokenizer_json=tokenizer_json)
    return model, tok


def test_every_script_with_a_gemma_model(tmp_path):
    """sample.py --chat (the gemma format, found from the tokenizer), SFT with LoRA, classification with LoRA, int4
    sampling, prepare_data.py and train.py --init_from on a Gemma-shaped model with the Gemma-style tokenizer."""
    import subprocess
    import sys
    from conftest import ROOT, run_script
    from test_finetune_instruct import synthetic_entries
    from tokenizer import format_chat
    model, tok = make_gemma_folder(tmp_path / 'm')
    chat = subprocess.run([sys.executable, str(ROOT / 'sample.py'), '--device=cpu', '--dtype=float32',
                           f'--init_from={tmp_path / "m"}', '--chat=True', '--temperature=0', '--max_new_tokens=12'],
                          input='hello\n', capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert chat.returncode == 0, chat.stderr
    ids = tok.encode(format_chat([{'role': 'user', 'content': 'hello'}], 'gemma'))
    assert ids[0] == 2 and ids.count(5) == 2  # <bos>, a <start_of_turn> for the user and for the model
    gen = model.generate(torch.tensor([ids]), 12, temperature=0, eos_id=6, use_cache=False)[0, len(ids):].tolist()
    reply = tok.decode(gen[:gen.index(6)] if 6 in gen else gen)
    assert chat.stdout.startswith('chat (gemma format') and reply in chat.stdout and len(reply) > 3, chat.stdout
    out = tmp_path / 'sft'  # SFT with LoRA in Gemma's chat format
    proc = run_here('finetune_instruct.py', f'--data={synthetic_entries(tmp_path / "d.json", n=20)}',
                    f'--init_from={tmp_path / "m"}', f'--out_dir={out}', '--prompt_style=gemma', '--lora_rank=4',
                    '--max_iters=3', '--eval_interval=100', '--max_new_tokens=4', '--judge=none', '--eval_limit=2')
    assert proc.returncode == 0, proc.stderr
    ckpt = weights.load_checkpoint(out)
    assert ckpt['prompt_style'] == 'gemma' and ckpt['model_args']['layer_types'][2] == 'full_attention'
    from test_finetune_classify import synthetic
    proc = run_here('finetune_classify.py', f'--data={synthetic(tmp_path / "syn.tsv", n=40)}', '--trainable=lora',
                    f'--init_from={tmp_path / "m"}', f'--out_dir={tmp_path / "cls"}', '--max_iters=3', '--batch_size=4',
                    '--eval_interval=100', '--eval_iters=1', '--num_epochs=1')
    assert proc.returncode == 0 and (tmp_path / 'cls' / 'classifier.pt').is_file(), proc.stderr
    proc = run_here('sample.py', f'--init_from={tmp_path / "m"}', '--quantize=int4', '--dtype=bfloat16', '--start=To be',
                    '--max_new_tokens=8', '--num_samples=1', '--temperature=0')
    assert proc.returncode == 0 and proc.stdout.startswith('To be'), proc.stderr
    (tmp_path / 'text.txt').write_text((ROOT.parent / 'shared' / 'data' / 'the-verdict.txt').read_text()[:20_000])
    proc = run_here('prepare_data.py', f'--input={tmp_path / "text.txt"}', f'--tokenizer={tmp_path / "m"}',
                    f'--data_dir={tmp_path / "data"}')
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / 'data' / 'meta.json').read_text())
    assert meta['vocab_size'] == 1024 and meta['eot_id'] == 1
    proc = run_script('train.py', f'--init_from={tmp_path / "m"}', f'--data_dir={tmp_path / "data"}',
                      f'--out_dir={tmp_path / "pre"}', '--block_size=64', '--batch_size=2', '--max_iters=2',
                      '--eval_interval=2', '--eval_iters=1', '--log_interval=1', '--sample_tokens=4',
                      '--warmup_iters=1')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert weights.load_checkpoint(tmp_path / 'pre')['model_args']['sandwich_norm']


def test_bench_knows_the_published_shapes():
    import runpy
    from conftest import ROOT
    shapes = runpy.run_path(str(ROOT / 'bench.py'), run_name='bench')['SHAPES']
    with torch.device('meta'):  # the published parameter counts: 268M and 1,000M
        assert GPT(shapes['gemma-3-270m']).get_num_params() == 268_098_176
        assert GPT(shapes['gemma-3-1b']).get_num_params() == 999_885_952
    cache = KVCache(shapes['gemma-3-270m'], 1, 'meta', torch.bfloat16, length=4096)
    kv_bytes = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    assert kv_bytes == (3 * 4096 + 15 * 512) * 2 * 256 * 2  # 3 global layers whole, 15 local ones their 512


def test_a_vocabulary_past_65536_ids_makes_uint32_shards(tmp_path):
    """Gemma 3's 262,144 tokens need uint32 shards: the fixture tokenizer with one added token at id 262,143."""
    from prepare_data import read_shard
    config = json.loads((FIXTURES / 'tokenizers' / 'gemma3' / 'tokenizer.json').read_text(encoding='utf-8'))
    config['added_tokens'].append({'id': 262143, 'content': '<image_soft_token>', 'single_word': False,
                                   'lstrip': False, 'rstrip': False, 'normalized': False, 'special': True})
    (tmp_path / 'tok').mkdir()
    (tmp_path / 'tok' / 'tokenizer.json').write_text(json.dumps(config), encoding='utf-8')
    (tmp_path / 'text.txt').write_text('To be, or not to be <image_soft_token> that is the question.\n' * 50)
    proc = run_here('prepare_data.py', f'--input={tmp_path / "text.txt"}', f'--tokenizer={tmp_path / "tok"}',
                    f'--data_dir={tmp_path / "data"}')
    assert proc.returncode == 0, proc.stderr
    shard = read_shard(sorted((tmp_path / 'data').glob('*train*.bin'))[0])
    assert shard.dtype == np.uint32 and 262143 in shard
