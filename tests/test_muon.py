"""Muon under DDP: each process orthogonalizes its share of the matrices and gathers the others'
updates; the result must be one process's step, and its state a checkpoint that resumes anywhere."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import model as model_module
from conftest import run_script
from model import GPT, GPTConfig

# 3 layers: 3 matrices of each shape for 2 processes (one sends a zero pad); 1 layer: a process
# with no matrix of some shapes
CONFIGS = [dict(block_size=16, vocab_size=96, n_layer=3, n_head=2, n_embd=32),
           dict(block_size=16, vocab_size=96, n_layer=1, n_head=2, n_embd=16)]


def train(config, steps, resume=None):
    """Muon (float32 Newton-Schulz) for `steps` steps on fixed random gradients, the same in
    every process as DDP's averaged ones; from `resume` (a checkpoint of this function) if given."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', optimizer='muon', muon_lr=0.02,
                                     muon_dtype=torch.float32)
    first = 0
    if resume is not None:
        model.load_state_dict(resume['model'])
        opt.load_state_dict(resume['optimizer'])
        first = resume['step']
    for step in range(first, steps):
        g = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return {'model': model.state_dict(), 'optimizer': opt.state_dict(), 'step': steps}


def worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    sizes = []  # how many matrices this process orthogonalizes, call by call
    real = model_module.orthogonalize
    model_module.orthogonalize = lambda G, *a, **kw: (sizes.append(G.size(0)), real(G, *a, **kw))[1]
    half = torch.load(os.path.join(out_dir, 'half.pt'), weights_only=True)
    runs = [train(c, 3) for c in CONFIGS] + [train(CONFIGS[0], 4, resume=half)]
    torch.save({'runs': runs, 'sizes': sizes}, os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


def assert_close(a, b, what):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_close(a[k], b[k], f'{what}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f'{what}[{i}]')
    elif isinstance(a, torch.Tensor):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (what, (a - b).abs().max())
    else:
        assert a == b, what


def test_two_processes_share_the_work_and_step_as_one(tmp_path):
    # a one-process checkpoint, resumed by the two (a file: tensors passed to spawn would be shared by both)
    torch.save(train(CONFIGS[0], 2), tmp_path / 'half.pt')
    mp.spawn(worker, args=(2, (tmp_path / 'init').as_posix(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    alone = [train(c, 3) for c in CONFIGS] + [train(CONFIGS[0], 4)]
    for r, got in enumerate(ranks):  # every process: the weights and the whole optimizer state of one process
        for i, (run, ref) in enumerate(zip(got['runs'], alone)):
            assert_close(run['model'], ref['model'], f'rank {r} run {i} model')
            assert_close(run['optimizer'], ref['optimizer'], f'rank {r} run {i} optimizer')
    # each process orthogonalized half of the matrices: 4 shapes x (3 + 1) layers x 3 steps, plus 2 resumed steps of 4 x 3
    muon = 4 * (3 * 3 + 1 * 3 + 3 * 2)
    assert [sum(got['sizes']) for got in ranks] == [muon // 2, muon // 2]


def test_bench_times_the_optimizer_step_alone():
    proc = run_script('bench.py', '--mode=optimizer', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
                      '--vocab_size=96', '--steps=2', '--warmup_steps=1')
    assert proc.returncode == 0, proc.stderr
    assert 'adamw' in proc.stdout and 'muon' in proc.stdout and 'ms/step' in proc.stdout
