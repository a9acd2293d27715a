"""Speed and scale features on CPU: bench.py, compile-friendliness, Muon, activation checkpointing. (Training with
both and resuming exactly: test_train.py's test_resume_continues_exactly.)"""
import copy
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_script
from model import GPT, GPTConfig


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=32), **kw}))


def test_bench_runs_a_tiny_config_in_both_modes():
    args = ('--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=2', '--steps=2',
            '--warmup_steps=1')
    proc = run_script('bench.py', *args)
    assert proc.returncode == 0, proc.stderr
    assert 'ms/step' in proc.stdout and 'tokens/s' in proc.stdout and 'peak memory' in proc.stdout
    ablate = run_script('bench.py', *args, '--ablate=True')
    assert ablate.returncode == 0, ablate.stderr
    for row in ('baseline', 'bfloat16 autocast', 'native LayerNorm and GELU', 'SDPA', 'micro-batch x2'):
        assert row in ablate.stdout
    gen = run_script('bench.py', '--mode=generate', *args, '--max_new_tokens=8', '--repeats=1', '--batch_size=1',
                     '--quantize=int8,int4', '--bandwidth_mb=16', '--profile=True')
    assert gen.returncode == 0 and 'KV cache == no cache: True' in gen.stdout, gen.stdout + gen.stderr
    for scheme in ('int8', 'int4'):  # timed in the same rounds
        assert f'ours {scheme}, KV cache' in gen.stdout
    assert "the machine's bandwidth probe: a plain read of 16 MB" in gen.stdout and ' GB/s ' in gen.stdout
    # --profile=True: where each of our models' generations spends its time, after the timed rounds
    assert gen.stdout.count('one generation: where its time goes') == 3 and 'aten::_weight_int8pack_mm' in gen.stdout


def test_bench_profile_prints_the_costliest_ops_after_the_timed_steps(tmp_path):
    # a GPU run's logs come back but its trace files may not: the table must reach stdout
    proc = run_script('bench.py', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=2',
                      '--steps=2', '--warmup_steps=1', '--profile=True', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table, timing = proc.stdout.index('Self CPU time total'), proc.stdout.index('ms/step')
    assert 'aten::' in proc.stdout[:table] and table < timing
    assert list((tmp_path / 'bench_trace').glob('*.json'))


@pytest.mark.parametrize('shape', ['qwen3-0.6b', 'llama-3.2-1b', 'smollm2-135m'])
def test_bench_shape_model_gives_a_normally_built_gpts_logits(shape):
    # bench.py --shape's model (built on the meta device) against GPT(config) holding the same weights:
    # the RoPE tables, which are no weights, must be computed too (Llama 3's scaled ones included)
    import dataclasses
    import bench
    config = dataclasses.replace(bench.SHAPES[shape], vocab_size=128, block_size=64, n_layer=2, n_embd=64,
                                 n_head=4, n_kv_head=2, head_dim=16, mlp_hidden=96)
    torch.manual_seed(0)
    model = bench.random_model(config, torch.float32).eval()
    ref = GPT(config).eval()
    ref.load_state_dict(model.state_dict())
    idx = torch.randint(0, 128, (2, 48))
    assert torch.allclose(model(idx)[0], ref(idx)[0], atol=1e-6)


def test_the_books_slow_blocks_compute_the_same_function():
    import bench
    model = tiny().eval()
    idx = torch.randint(0, 96, (2, 16))
    ref = model(idx)[0]
    bench.use_book_blocks(model, norms=True, attention=True)
    assert torch.allclose(model(idx)[0], ref, atol=1e-5)


def test_model_compiles_without_graph_breaks():
    model = tiny(padded_vocab_size=128)  # the cut-off padding rows too
    idx = torch.randint(0, 96, (2, 16))
    explained = torch._dynamo.explain(model)(idx, idx)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    model.grad_checkpoint = True
    model.train()
    assert torch._dynamo.explain(model)(idx, idx).graph_break_count == 0


def test_muon_lowers_the_loss_like_adamw():
    idx = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))
    final = {}
    for name in ('adamw', 'muon'):
        model = tiny()
        opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), 'cpu', optimizer=name)
        start = model(idx, idx)[1].item()
        for _ in range(15):
            loss = model(idx, idx)[1]
            opt.zero_grad()
            loss.backward()
            opt.step()
        final[name] = model(idx, idx)[1].item()
        assert final[name] < start - 1.0, (name, start, final[name])
    muon_groups = [g for g in opt.param_groups if g['use_muon']]
    assert all(p.dim() == 2 for g in muon_groups for p in g['params'])
    assert muon_groups[0]['lr_scale'] == pytest.approx(0.02 / 3e-3)
    with pytest.raises(ValueError, match='unknown optimizer'):
        tiny().configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', optimizer='sgd')


def test_muon_orthogonalizes():
    from model import orthogonalize
    G = torch.randn(64, 32)
    O = orthogonalize(G).float()
    s = torch.linalg.svdvals(O)
    assert s.min() > 0.5 and s.max() < 1.3  # Newton-Schulz lands near 1, not exactly (by design)
    stack = torch.randn(3, 48, 96)  # a stack is done at once, each matrix as if alone
    together = orthogonalize(stack, dtype=torch.float32)
    for G, O in zip(stack, together):
        assert torch.allclose(O, orthogonalize(G, dtype=torch.float32), atol=1e-5)


def test_newton_schulz_is_near_the_svds_orthogonal_factor():
    """orthogonalize (in float32) against the SVD G = U S V^T: the same singular vectors (U^T O V diagonal,
    positive), singular values in the quintic's band around 1 (measured 0.68-1.14 on Gaussian matrices that
    are not square; it does not converge to exactly 1 by design), and close to U V^T as a whole."""
    from model import orthogonalize
    for shape in [(64, 32), (32, 64), (128, 32), (3, 48, 96)]:  # tall, wide, very tall, a stack
        G = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape) + shape[-1]))
        O = orthogonalize(G, dtype=torch.float32)
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        D = U.mT @ O @ Vh.mT  # O = U D V^T with D diagonal iff O has G's singular vectors
        diag = torch.diagonal(D, dim1=-2, dim2=-1)
        assert (D - torch.diag_embed(diag)).abs().max() < 1e-4, shape  # measured ~2e-6
        assert diag.min() > 0.6 and diag.max() < 1.2, (shape, diag.min(), diag.max())
        s = torch.linalg.svdvals(O)
        assert s.min() > 0.6 and s.max() < 1.2, shape
        cos = torch.nn.functional.cosine_similarity(O.flatten(-2), (U @ Vh).flatten(-2), dim=-1)
        assert cos.min() > 0.97, (shape, cos)  # measured 0.984-0.988


def test_muon_adamw_half_equals_torch_adamw():
    """The groups without use_muon are plain AdamW: the same steps as torch.optim.AdamW on the same
    parameters and gradients, with weight decay and without, under a changing learning rate."""
    from model import MuonWithAdamW
    torch.manual_seed(0)
    start = [torch.randn(8, 4), torch.randn(6), torch.randn(3, 5), torch.randn(7)]
    ours = [p.clone().requires_grad_() for p in start]
    ref = [p.clone().requires_grad_() for p in start]
    betas = (0.9, 0.95)
    opt = MuonWithAdamW([{'params': ours[:2], 'use_muon': False, 'lr': 1e-2, 'betas': betas, 'weight_decay': 0.1},
                         {'params': ours[2:], 'use_muon': False, 'lr': 1e-2, 'betas': betas, 'weight_decay': 0.0}])
    adamw = torch.optim.AdamW([{'params': ref[:2], 'weight_decay': 0.1}, {'params': ref[2:], 'weight_decay': 0.0}],
                              lr=1e-2, betas=betas, eps=1e-8)
    for step in range(6):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        for o in (opt, adamw):
            for group in o.param_groups:
                group['lr'] = 1e-2 * (0.5 + step / 10)  # as train.py's schedule sets it before each step
        opt.step()
        adamw.step()
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert torch.allclose(a, b, rtol=0, atol=1e-6), (step, i, (a - b).abs().max())
    assert all((a - p).abs().max() > 1e-2 for a, p in zip(ours, start))  # they did move


def test_muon_step_matches_a_per_matrix_update():
    """The batched step (one Newton-Schulz per weight shape) moves every matrix as the textbook
    per-matrix loop does: decoupled weight decay, momentum, Nesterov blend, orthogonalize, scale by
    sqrt(rows/cols)."""
    from model import orthogonalize
    model = tiny()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', optimizer='muon', muon_lr=0.02,
                                     muon_dtype=torch.float32)
    muon = [p for g in opt.param_groups if g['use_muon'] for p in g['params']]
    assert len({tuple(p.shape) for p in muon}) < len(muon)  # shapes repeat across blocks: batching applies
    expected = {}
    for step in range(2):
        idx = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(step))
        model(idx, idx)[1].backward()
        for p in muon:
            buf = expected.setdefault(('buf', p), torch.zeros_like(p))
            buf.lerp_(p.grad, 0.05)
            u = orthogonalize(p.grad.lerp(buf, 0.95), dtype=torch.float32)
            expected[p] = p.detach() * (1 - 0.02 * 0.1) - 0.02 * max(1.0, p.size(0) / p.size(1)) ** 0.5 * u
        opt.step()
        opt.zero_grad(set_to_none=True)
        for p in muon:
            assert torch.allclose(p, expected[p], atol=1e-6)


def test_grad_checkpoint_gives_the_same_gradients():
    model = tiny(dropout=0.1).train()
    other = copy.deepcopy(model)
    other.grad_checkpoint = True
    idx = torch.randint(0, 96, (4, 32))
    for m in (model, other):
        torch.manual_seed(7)  # the same dropout masks; checkpointing replays them in the recomputation
        m(idx, idx)[1].backward()
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_bench_times_llama_cpp_on_the_same_weights_in_the_same_rounds(tmp_path):
    """--llamacpp: GGUFs of the benchmarked weights (F16, and Q8_0 and Q4_0 beside int8 and int4), each timed by
    llama-bench in every round, its own seconds taken; here a stand-in llama-bench reports 1 s a run and checks
    what it is given, and a stand-in llama-quantize copies."""
    fake_bench, fake_quantize, calls = tmp_path / 'llama-bench', tmp_path / 'llama-quantize', tmp_path / 'calls'
    fake_bench.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
model = open(args[args.index('-m') + 1], 'rb').read(4)
assert model == b'GGUF' and args[args.index('-n') + 1] == '8' and args[args.index('-t') + 1] == '2', args
open({str(calls)!r}, 'a').write(args[args.index('-m') + 1] + chr(10))
print(json.dumps([dict(avg_ns=1e9)]))
""")
    fake_quantize.write_text(f"#!{sys.executable}\nimport shutil, sys\nshutil.copy(sys.argv[1], sys.argv[2])\n")
    for f in (fake_bench, fake_quantize):
        f.chmod(0o755)
    args = ('--mode=generate', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--vocab_size=320',
            '--max_new_tokens=8', '--prompt_tokens=1', '--repeats=2', '--batch_size=1', '--quantize=int8,int4',
            '--bandwidth_mb=16', '--device=cpu', '--uncached=False')
    proc = run_script('bench.py', *args, f'--llamacpp={fake_bench}')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split('  ')[0]: line for line in proc.stdout.splitlines() if line.startswith(('ours', 'llama.cpp'))}
    for kind in ('F16', 'Q8_0', 'Q4_0'):  # 8 tokens in llama-bench's 1 s
        assert rows[f'llama.cpp {kind}'].split()[2] == '8.0', rows
    assert rows['ours, KV cache'].endswith(' F16') and rows['ours int8, KV cache'].endswith(' Q8_0')
    assert rows['ours int4, KV cache'].endswith(' Q4_0')
    ran = calls.read_text().split()
    assert len(ran) == 9 and {Path(p).name for p in ran} == {'bench-f16.gguf', 'bench-q8_0.gguf', 'bench-q4_0.gguf'}
    missing = run_script('bench.py', *args, f'--llamacpp={tmp_path / "nothing"}')
    assert missing.returncode != 0 and 'llama-bench' in missing.stderr.strip().splitlines()[-1]
