"""Speed and scale features on CPU: bench.py, compile-friendliness, Muon, activation checkpointing."""
import copy

import pytest
import torch

from conftest import run_script
from model import GPT, GPTConfig


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=32), **kw}))


def test_bench_runs_a_tiny_config_in_both_modes():
    args = ('--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=2', '--steps=2', '--warmup_steps=1')
    proc = run_script('bench.py', *args)
    assert proc.returncode == 0, proc.stderr
    assert 'ms/step' in proc.stdout and 'tokens/s' in proc.stdout and 'peak memory' in proc.stdout
    ablate = run_script('bench.py', *args, '--ablate=True')
    assert ablate.returncode == 0, ablate.stderr
    for row in ('baseline', 'bfloat16 autocast', 'native LayerNorm and GELU', 'SDPA', 'micro-batch x2'):
        assert row in ablate.stdout
    gen = run_script('bench.py', '--mode=generate', *args, '--max_new_tokens=8', '--repeats=1', '--batch_size=1')
    assert gen.returncode == 0 and 'KV cache == no cache: True' in gen.stdout, gen.stdout + gen.stderr


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


def test_train_with_muon_and_checkpointing_runs_and_resumes(tmp_path):
    from prepare_data import prepare
    data = prepare('pydoc', data_dir=tmp_path / 'pydoc', quiet=True)
    args = [f'--data_dir={data}', f'--out_dir={tmp_path}/o', '--n_layer=2', '--n_head=2', '--n_embd=32',
            '--block_size=32', '--batch_size=8', '--eval_interval=10', '--eval_iters=2', '--log_interval=5',
            '--optimizer=muon', '--grad_checkpoint=True', '--sample_prompt=']
    first = run_script('train.py', *args, '--max_iters=10')
    second = run_script('train.py', *args, '--max_iters=20', '--init_from=resume')
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert 'step 20: train loss' in second.stdout
