"""
The setup every script shares: config overrides, device and dtype choice, autocast, distributed init, seeding,
compile and the training plots. Imports nothing from this project.

Config (nanoGPT's idea, made safer): each script keeps its settings as plain globals at the top and calls
`configure(globals())`. Then
    python train.py config/train_verdict.py --batch_size=32 --compile=False
runs the config file (plain Python assigning the same globals), then applies each --key=value, parsed with
ast.literal_eval (a bare word stays a string) and of the default's type; an unknown key stops naming the closest.
"""
import ast
import difflib
import importlib
import os
import re
import sys
from contextlib import nullcontext
from pathlib import Path

import torch


def die(msg):
    """Stop with one clear line on stderr and exit code 1 (bad input, not a bug)."""
    sys.exit(f"error: {msg}")


def config_keys(g):
    """A script's overridable settings: its lower-case globals of plain types (UPPER_CASE are constants)."""
    return [k for k, v in g.items() if not k.startswith('_') and not k.isupper()
            and isinstance(v, (int, float, bool, str, type(None), tuple, list))]


def run_config(g):
    """{setting: value} as this run has them, after the overrides: what a checkpoint records the run was asked."""
    return {k: g[k] for k in config_keys(g)}


def _typed(value, default, shown):
    """`value` converted to the type of `default`, or stop naming the key."""
    if default is None or value is None:
        return value
    if isinstance(value, str) and isinstance(default, bool) and value.lower() in ('true', 'false'):
        value = value.lower() == 'true'
    if isinstance(default, float) and type(value) is int:
        value = float(value)  # --learning_rate=1 means 1.0
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        value = type(default)(value)
    if type(value) is not type(default):  # type(), not isinstance: True is no int here
        die(f"{shown}: expected {type(default).__name__} like the default {default!r}")
    return value


def configure(g, argv=None):
    """Apply `[config_file.py] --key=value ...` to the script's globals `g`; return the keys."""
    argv = sys.argv[1:] if argv is None else argv
    keys = config_keys(g)
    if '-h' in argv or '--help' in argv:
        doc = (g.get('__doc__') or '').strip()
        print(doc.splitlines()[0] if doc else '')
        print(f"usage: python {os.path.basename(sys.argv[0])} [config/file.py] [--key=value ...]\n")
        comments = {}  # the comment beside each setting in the script, shown as its help
        source = Path(g['__file__']).read_text(encoding='utf-8') if g.get('__file__') else ''
        for key, comment in re.findall(r"^(\w+)\s*=[^#\n]*#\s*(.*)", source, re.MULTILINE):
            comments.setdefault(key, comment)
        for k in keys:
            print(f"  --{k}={g[k]!r}" + (f"  # {comments[k]}" if k in comments else ""))
        sys.exit(0)
    for arg in argv:
        if not arg.startswith('--'):  # a config file: plain Python assigning the same globals
            if not os.path.isfile(arg):
                die(f"config file {arg} not found (expected a path like config/train_verdict.py or --key=value)")
            defaults = {k: g[k] for k in keys}
            exec(compile(Path(arg).read_text(encoding='utf-8'), arg, 'exec'), g)  # code you chose to run (nanoGPT)
            for k in config_keys(g):
                if k not in defaults:
                    die(f"config file {arg} sets unknown key '{k}'" + _closest(k, keys))
                g[k] = _typed(g[k], defaults[k], f"{arg}: {k}={g[k]!r}")
            continue
        key, eq, text = arg[2:].partition('=')
        if not eq:
            die(f"'{arg}': write --{key}=value")
        if key not in keys:
            die(f"unknown key --{key}" + _closest(key, keys) + " (--help lists them)")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # --init_from=gpt2 needs no quotes
        if isinstance(g[key], str) and not isinstance(value, str):
            value = text  # --start=42 is the text "42"
        g[key] = _typed(value, g[key], f"--{key}={text}")
    return keys


def _closest(key, keys):
    match = difflib.get_close_matches(key, keys, n=1)
    return f"; did you mean --{match[0]}?" if match else ""


def pick_device(device='auto'):
    if device == 'auto':
        if torch.cuda.is_available():
            return 'cuda'
        if getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available():
            return 'mps'
        return 'cpu'
    if device.startswith('cuda') and not torch.cuda.is_available():
        die(f"--device={device} but no CUDA GPU is visible; use --device=auto or cpu")
    return device


def cpu_has_native_bf16():
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX: recent Xeons, AMD Zen 4+); elsewhere it is
    emulated, slower than float32. PyTorch kernels held to AVX2 (ATEN_CPU_CAPABILITY=avx2) cannot use it."""
    if 'AVX512' not in torch.backends.cpu.get_cpu_capability():
        return False
    return any(getattr(torch.cpu, p, lambda: False)() for p in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'))


_PEAK_FLOPS = [  # dense tensor-core FLOP/s from the vendors' data sheets: (name, bf16/fp16, float32 as TF32);
    # first match wins ('H100 NVL' before 'H100', the SXM part). V100 and T4 have no TF32: plain FP32 there.
    ('H200', 989e12, 494e12), ('H100 NVL', 835e12, 418e12), ('H100 PCIe', 756e12, 378e12),
    ('H100', 989e12, 494e12), ('H800', 989e12, 494e12), ('GH200', 989e12, 494e12),
    ('A100', 312e12, 156e12), ('A800', 312e12, 156e12), ('L40S', 362e12, 183e12), ('L40', 181e12, 90.5e12),
    ('A10G', 125e12, 62.5e12), ('A10', 125e12, 62.5e12), ('L4', 121e12, 60e12), ('A6000', 155e12, 77.4e12),
    ('V100', 125e12, 15.7e12), ('T4', 65e12, 8.1e12), ('4090', 165e12, 82.6e12), ('4080', 97.5e12, 48.7e12),
    ('4070', 58e12, 29e12), ('3090', 71e12, 35.6e12), ('3080', 59.5e12, 29.8e12),
]


def gpu_peak_flops(device, dtype='bfloat16'):
    """Peak FLOP/s of the CUDA device from its name for the dtype the matmuls run in (float32 as TF32),
    or None (CPU, MPS, a GPU not listed: give train.py --peak_flops then)."""
    if not str(device).startswith('cuda') or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    row = next((row for row in _PEAK_FLOPS if row[0] in name), None)
    return None if row is None else row[2] if dtype == 'float32' else row[1]


def pick_dtype(dtype, device_type):
    """'auto': bfloat16 where the device computes it natively (Ampere and newer GPUs, CPUs with
    AVX512-BF16 or AMX), float16 (+GradScaler) on older GPUs, float32 elsewhere."""
    if dtype == 'auto':
        if device_type == 'cuda':  # V100 and T4 *emulate* bfloat16 (slowly): ask for native support
            dtype = 'bfloat16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'float16'
        elif device_type == 'cpu' and cpu_has_native_bf16():
            dtype = 'bfloat16'
        else:
            dtype = 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        die(f"--dtype={dtype}: use auto, float32, bfloat16 or float16")
    return dtype


def setup(device='auto', dtype='auto', seed=1337):
    """(device, device_type, dtype_name, autocast context) for a script's loop, seeded."""
    device = pick_device(device)
    device_type = 'cuda' if device.startswith('cuda') else device.split(':')[0]
    if device.startswith('cuda:'):  # cuda:1 must be the current device, or synchronize, memory stats,
        torch.cuda.set_device(device)  # the bf16 query and the RNG state all act on cuda:0
    dtype = pick_dtype(dtype, device_type)
    old_torch = tuple(map(int, re.findall(r'\d+', torch.__version__)[:2])) < (2, 8)
    if device_type == 'mps' and dtype == 'float16' and old_torch:
        die("--dtype=float16 on MPS needs torch 2.8 or newer (its GradScaler uses float64 before); "
            "use --dtype=bfloat16")
    torch.manual_seed(seed)
    if device_type == 'cuda':  # tensor cores for any float32 matmul left
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))
    return device, device_type, dtype, ctx


def optimizer_step(loss, optimizer, scaler, params, grad_clip=0.0):
    """Backward and one optimizer step, as the fine-tuning loops do it: the loss scaled for
    float16 (a no-op otherwise), gradients clipped to grad_clip (0 = not), then zeroed."""
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def init_distributed(device='auto'):
    """(ddp, rank, local_rank, world_size, device), in torchrun's process group if RANK is set (nccl or gloo)."""
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 0, 1, device
    import torch.distributed as dist
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    use_cuda = torch.cuda.is_available() and device in ('auto', 'cuda') or device.startswith('cuda')
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            die(f"torchrun started process {local_rank} of this machine but only {torch.cuda.device_count()} GPU(s) "
                "are visible; use --nproc_per_node=<number of GPUs>, or --device=cpu")
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    backend = 'nccl' if use_cuda and dist.is_nccl_available() else 'gloo'
    from datetime import timedelta  # the others wait in a collective while rank 0 downloads GPT-2 XL's 6 GB:
    dist.init_process_group(backend=backend, timeout=timedelta(hours=1))  # more than NCCL's default 10 minutes
    return True, rank, local_rank, world_size, (device if use_cuda else 'cpu')


def local_rank0_first(fn, distributed, local_rank):
    """Run fn (a download into a shared cache, a data set's preparation: two processes writing one file would
    corrupt it) in three waves and return its result: rank 0; each other machine's first process (files ready if
    the disk is shared); the rest. An error in any wave ends every process with the same line, not a hang."""
    rank = int(os.environ.get('RANK', 0))
    waves = (rank == 0, rank != 0 and local_rank == 0, local_rank != 0)
    result = None
    for mine in waves if distributed else (True,):
        error = None
        if mine:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 -- whatever it is, every rank must hear of it
                error = str(e) or type(e).__name__
        if distributed:
            import torch.distributed as dist
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e), None)
        if error:
            die(error)
    return result


def compile_available(device_type):
    """Whether torch.compile can run here; if not, say so (the script then runs eagerly)."""
    import shutil
    if device_type == 'cpu' and not any(shutil.which(c) for c in ('cc', 'gcc', 'clang', 'cl')):
        print("notice: --compile needs a C compiler for the CPU backend; running without it")
        return False
    needs_triton = device_type == 'mps' or (sys.platform == 'win32' and device_type == 'cuda')
    if needs_triton:
        try:
            importlib.import_module('triton')  # installed is not enough: a broken install fails here, not mid-run
        except ImportError:
            print(f"notice: torch.compile is not supported for {device_type} here; running without it")
            return False
    return True


def maybe_compile(model, enabled, device_type, **kwargs):
    return torch.compile(model, **kwargs) if enabled and compile_available(device_type) else model


def compile_decoding(model, enabled, device_type):
    """model.decode_step compiled into one fixed graph for every generated token (on CUDA also
    captured as a CUDA graph: one launch per token instead of hundreds), or None: generate() then
    runs eagerly. The prompt is always computed eagerly (its length varies)."""
    if not (enabled and compile_available(device_type)):
        return None
    print("--compile=True: the first token compiles the one-token step (Inductor: a minute or so the first time, "
          "seconds on the next start, from its cache in TORCHINDUCTOR_CACHE_DIR)", file=sys.stderr)
    if device_type == 'cuda' and any(p.dtype == torch.int8 for p in model.parameters()):
        # int8 weights (quantize.Int8Linear): inductor fuses their dequantization into a one-row matmul only with
        # coordinate-descent tuning on (gpt-fast's setting); else the bf16 weights are written out and read back
        return torch.compile(model.decode_step, fullgraph=True, dynamic=False,  # cudagraphs: as reduce-overhead
                             options={'triton.cudagraphs': True, 'coordinate_descent_tuning': True})
    return torch.compile(model.decode_step, fullgraph=True, dynamic=False,
                         mode='reduce-overhead' if device_type == 'cuda' else None)


def synchronize(device_type):
    """Wait for the GPU's queued work, so that a timer measures it (CUDA and MPS run asynchronously)."""
    if device_type == 'cuda':
        torch.cuda.synchronize()
    elif device_type == 'mps':
        torch.mps.synchronize()


def save_plot(path, xlabel, panels):
    """The book's training plots (ch05's losses, ch06's losses and accuracies): one panel per
    (name, x, training values, validation values). matplotlib is an optional extra: without it, a notice."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(pip install matplotlib for {path})")
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 1, 4), squeeze=False)
    for ax, (name, x, train, val) in zip(axes[0], panels):
        ax.plot(x, train, label=f'Training {name.lower()}')
        ax.plot(x, val, linestyle='-.', label=f'Validation {name.lower()}')
        ax.set(xlabel=xlabel, ylabel=name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
