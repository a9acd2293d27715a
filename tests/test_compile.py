"""train.py --compile=True compiles once: its evaluations and samples recompile nothing per block or per
token (dynamo's recompiles counted through TORCH_LOGS=recompiles), here under torchrun with FSDP. (Alone: the
compiled run of test_train.py, which also compares its losses with an eager run's.)"""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from configurator import compile_available

pytestmark = pytest.mark.skipif(not compile_available('cpu'), reason="torch.compile needs a C compiler here")


def compiled_run(data, out, *launcher, extra=()):
    """The number of recompiles in a compiled 15-step run with an evaluation and a sample every 5 steps."""
    args = [f'--data_dir={data}', f'--out_dir={out}', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
            '--batch_size=8', '--eval_interval=5', '--eval_iters=2', '--log_interval=5', '--sample_tokens=8',
            '--warmup_iters=5', '--max_iters=15', '--device=cpu', '--dtype=float32', '--optimizer=adamw',
            '--compile=True', *extra]
    env = {**os.environ, 'TORCH_LOGS': 'recompiles'}
    proc = subprocess.run([sys.executable, *launcher, str(ROOT / 'train.py'), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('val loss') >= 3 and proc.stdout.count('sample:') >= 3, proc.stdout[-2000:]  # evals ran
    return proc.stderr.count('Recompiling function')


def test_fsdp_compiled_blocks_do_not_recompile_for_the_sample(pydoc_data, tmp_path):
    # each block is compiled on its own under FSDP; the eval sample (batch 1, a KV cache, one token a step)
    # used to recompile every block at every evaluation. Evaluation (no_grad) may add its one graph per rank.
    recompiles = compiled_run(pydoc_data, tmp_path / 'fsdp', '-m', 'torch.distributed.run', '--standalone',
                              '--nproc_per_node=2', extra=['--ddp=fsdp', '--gradient_accumulation_steps=2'])
    assert recompiles <= 2
