"""configurator.py: overrides, types, config files, helpful errors."""
import pytest

from configurator import configure, pick_dtype


def fresh():
    return {'batch_size': 12, 'learning_rate': 6e-4, 'compile': False, 'init_from': 'scratch', 'out_dir': 'out',
            'betas': (0.9, 0.95), 'peak': None, '_private': 1, 'MAX_TOKENS': 5}


def test_overrides_are_parsed_as_python_literals():
    g = fresh()
    configure(g, ['--batch_size=32', '--learning_rate=1', '--compile=True', '--init_from=gpt2', '--out_dir=123',
                  '--betas=(0.8, 0.9)', '--peak=3e14'])
    assert g['batch_size'] == 32 and g['learning_rate'] == 1.0 and isinstance(g['learning_rate'], float)
    assert g['compile'] is True and g['init_from'] == 'gpt2' and g['out_dir'] == '123'
    assert g['betas'] == (0.8, 0.9) and g['peak'] == 3e14
    configure(g, ['--compile=false'])
    assert g['compile'] is False


@pytest.mark.parametrize('arg, message', [
    ('--batch_sise=4', 'did you mean --batch_size'),
    ('--batch_size=4.5', 'expected int'),
    ('--batch_size=True', 'expected int'),
    ('--compile=1', 'expected bool'),
    ('--learning_rate=fast', 'expected float'),
    ('--batch_size', 'write --batch_size=value'),
    ('config/nope.py', 'config file config/nope.py not found'),
])
def test_bad_overrides_stop_with_one_line(arg, message, capsys):
    with pytest.raises(SystemExit) as e:
        configure(fresh(), [arg])
    assert message in str(e.value) and str(e.value).startswith('error: ') and '\n' not in str(e.value)


def test_config_files_set_known_keys_and_are_type_checked(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text("batch_size = 64\nlearning_rate = 3e-4\n")
    g = fresh()
    configure(g, [str(cfg), '--batch_size=8'])  # later arguments win
    assert g['batch_size'] == 8 and g['learning_rate'] == 3e-4
    cfg.write_text("batch_sise = 64\n")
    with pytest.raises(SystemExit, match="unknown key 'batch_sise'; did you mean --batch_size"):
        configure(fresh(), [str(cfg)])
    cfg.write_text("compile = 'yes'\n")
    with pytest.raises(SystemExit, match='expected bool'):
        configure(fresh(), [str(cfg)])


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as e:
        configure(fresh(), ['--help'])
    out = capsys.readouterr().out
    assert e.value.code == 0 and '--batch_size=12' in out and '--learning_rate=0.0006' in out
    assert '_private' not in out and 'MAX_TOKENS' not in out


def test_dtype_choice(monkeypatch):
    import configurator
    monkeypatch.setattr(configurator, 'cpu_has_native_bf16', lambda: False)  # whatever this host's CPU is
    assert pick_dtype('auto', 'cpu') == 'float32'
    assert pick_dtype('bfloat16', 'cpu') == 'bfloat16'
    with pytest.raises(SystemExit, match='--dtype=fp8'):
        pick_dtype('fp8', 'cpu')


# ------------------------------------------------------------------ device logic, with the GPU queries mocked

def test_auto_dtype_asks_for_native_bfloat16(monkeypatch):
    import torch
    # a V100/T4 "supports" bfloat16 only by emulation: auto must then pick float16 + GradScaler
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: including_emulation)
    assert pick_dtype('auto', 'cuda') == 'float16'
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)  # Ampere and newer
    assert pick_dtype('auto', 'cuda') == 'bfloat16'
    assert pick_dtype('auto', 'mps') == 'float32' and pick_dtype('bfloat16', 'cuda') == 'bfloat16'


def test_setup_makes_the_named_gpu_current(monkeypatch):
    import torch
    import configurator
    calls = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'set_device', calls.append)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)
    dev, device_type, dtype, _ = configurator.setup('cuda:1', 'float32')
    assert (dev, device_type, calls) == ('cuda:1', 'cuda', ['cuda:1'])  # before anything asks "the" GPU
    configurator.setup('cuda', 'float32')  # no index: whatever is current (torchrun's local rank) stays
    assert calls == ['cuda:1']


def test_gpu_peak_flops_follows_the_dtype_and_the_exact_part(monkeypatch):
    import torch
    from configurator import gpu_peak_flops
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    for name, bf16, fp32 in [('NVIDIA H100 80GB HBM3', 989e12, 494e12), ('NVIDIA H100 NVL', 835e12, 418e12),
                             ('NVIDIA H100 PCIe', 756e12, 378e12), ('Tesla V100-SXM2-16GB', 125e12, 15.7e12)]:
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device, n=name: n)
        assert gpu_peak_flops('cuda:0', 'bfloat16') == gpu_peak_flops('cuda', 'float16') == bf16, name
        assert gpu_peak_flops('cuda', 'float32') == fp32, name
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device: 'Some Future GPU')
    assert gpu_peak_flops('cuda', 'bfloat16') is None and gpu_peak_flops('cpu', 'float32') is None


def test_mps_and_cuda_timers_wait_for_the_device(monkeypatch):
    import torch
    import configurator
    calls = []
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda: calls.append('cuda'))
    monkeypatch.setattr(torch.mps, 'synchronize', lambda: calls.append('mps'))
    for device_type in ('cuda', 'mps', 'cpu'):
        configurator.synchronize(device_type)
    assert calls == ['cuda', 'mps']


RANK0_FIRST = '''
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from configurator import init_distributed, local_rank0_first
distributed, rank, local_rank, world_size, dev = init_distributed('cpu')
log = Path(sys.argv[1])
def fetch():  # stands for a download into a shared cache: two writers at once would corrupt it
    with open(log, 'a') as f:
        f.write(f'start {rank}\\n')
    time.sleep(0.5)
    if sys.argv[2] == 'fail':
        raise OSError('download of http://x/y failed: HTTP 404 Not Found; check the URL')
    with open(log, 'a') as f:
        f.write(f'end {rank}\\n')
    return rank
sys.stdout.write(f'got {local_rank0_first(fetch, distributed, local_rank)}\\n')
sys.stdout.flush()
import torch.distributed as dist
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.parametrize('mode', ['ok', 'fail'])
def test_rank0_downloads_first_and_an_error_ends_every_process(tmp_path, mode):
    import subprocess
    import sys
    from conftest import ROOT
    script = tmp_path / 'fetch.py'
    script.write_text(RANK0_FIRST)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(script), str(tmp_path / 'log'), mode, str(ROOT)], capture_output=True, text=True, timeout=120)
    log = (tmp_path / 'log').read_text().split('\n')[:-1]
    if mode == 'ok':
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert log == ['start 0', 'end 0', 'start 1', 'end 1']  # never two at once
        assert 'got 0' in proc.stdout and 'got 1' in proc.stdout
    else:
        assert proc.returncode != 0 and log == ['start 0']  # rank 1 neither fetched nor hung
        assert proc.stderr.count('error: download of http://x/y failed') == 2, proc.stderr[-2000:]


def test_auto_dtype_on_cpu_follows_native_bfloat16(monkeypatch):
    import torch
    import configurator
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False)
    assert not configurator.cpu_has_native_bf16() and pick_dtype('auto', 'cpu') == 'float32'  # AVX2: 10-15x slower in bf16
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: True)  # e.g. AMD Zen 4, Xeon Cooper Lake+
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX512')
    assert configurator.cpu_has_native_bf16() and pick_dtype('auto', 'cpu') == 'bfloat16'
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX2')  # ATEN_CPU_CAPABILITY=avx2
    assert not configurator.cpu_has_native_bf16() and pick_dtype('auto', 'cpu') == 'float32'


def test_compile_is_refused_in_one_notice_where_triton_does_not_import(monkeypatch, capsys):
    """MPS (and CUDA on Windows) compile through triton: one that is installed but does not import is no triton."""
    import sys
    import types
    from configurator import compile_available
    monkeypatch.setitem(sys.modules, 'triton', None)  # as a broken install: `import triton` raises ImportError
    assert compile_available('mps') is False and 'not supported for mps' in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, 'triton', types.ModuleType('triton'))
    assert compile_available('mps') is True
