"""
Every file a model lives in: our own checkpoints (out_dir/ckpt.pt, atomic, loaded weights-only), and published
weights in and out (book ch. 5.5 and the "GPT to Llama" bonus): downloads from the Hugging Face hub with requests,
safetensors read and written without the safetensors package, GPT-2 and the Llama family (Llama 3.2, Qwen2.5,
Qwen3, SmolLM2) mapped onto model.py's one GPT. Functions, not methods of GPT: model.py imports nothing of ours.
    from weights import from_pretrained, save_pretrained
    model = from_pretrained('qwen3-0.6b')        # a GPT-2 size, a short name, a hub id or a local folder
    save_pretrained(model, 'my-qwen')            # the family's own layout, loads in transformers
"""
import json
import math
import mmap
import os
import pickle
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from model import GPT, GPTConfig, PRESETS, merged_state_dict


# -------------------------------------------------------------------- our checkpoints (out_dir/ckpt.pt)

@contextmanager
def atomic_write(path):
    """`with atomic_write(path) as tmp:` write to tmp; it replaces `path` only when the block ends without an
    error, so a crash never leaves half a file where a whole one was (os.replace is atomic on every platform)."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_text(path, text):  # UTF-8, atomically
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding='utf-8')


def save_json(path, obj):
    save_text(path, json.dumps(obj, indent=2))


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def load_state_dict_checked(model, sd, source):
    """load_state_dict with one readable line for missing, unexpected or mis-shaped tensors."""
    sd = {k.removeprefix('_orig_mod.').removeprefix('module.'): v for k, v in sd.items()}
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(t.shape)}" for k, t in own.items()
              if k in sd and sd[k].shape != t.shape]
    if missing or extra or shapes:
        what = '; '.join(f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                         for label, items in (('missing', missing), ('unexpected', extra), ('shape', shapes)) if items)
        raise ValueError(f"{source} does not fit this model ({what})")
    with torch.no_grad():
        model.load_state_dict(sd)


def save_checkpoint(path, model, tokenizer, config, weights=None, **state):
    """A checkpoint at path, atomically. What every script loads from it: the weights (LoRA folded in; or `weights`,
    a state dict gathered elsewhere, as FSDP's), the model's config, the tokenizer's spec and the run's config (its
    flags); then `state`: what the script that wrote it needs to continue (step, optimizer, generators, ...)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ckpt = {'model': merged_state_dict(model) if weights is None else weights, 'model_args': asdict(model.config),
            'tokenizer': tokenizer, 'config': config, **state}
    with atomic_write(path) as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(path, map_location='cpu'):
    """A checkpoint dict (path may be its out_dir). weights_only=True: loading never runs code
    from the file; a hostile, truncated or foreign file raises ValueError with one line."""
    path = Path(path)
    path = path if path.suffix == '.pt' else path / 'ckpt.pt'
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train one first (python train.py) or use --init_from=gpt2")
    try:
        with warnings.catch_warnings():  # a foreign pickle may warn about its protocol: the error below says it all
            warnings.simplefilter('ignore')
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if 'Weights only load failed' not in str(e):  # e.g. a truncated legacy pickle
            raise ValueError(f"{path} is not a loadable checkpoint ({_first_line(e)}); it may be truncated") from None
        # PyTorch's own message advises weights_only=False here: exactly what must not be done with such a file
        raise ValueError(f"{path} holds Python objects beyond tensors and plain data, so it was refused unread: "
                         "it is not a checkpoint of this project; load only files you made or trust") from None
    except Exception as e:
        raise ValueError(f"{path} is not a loadable checkpoint ({_first_line(e)}); "
                         "it may be truncated or written by another program; re-save or re-train it") from None
    if not isinstance(ckpt, dict) or not {'model', 'model_args'} <= set(ckpt):
        raise ValueError(f"{path} is not a checkpoint of this project (it lacks 'model' and 'model_args')")
    return ckpt


def model_from_checkpoint(ckpt, source='checkpoint', **overrides):
    """GPT built from a checkpoint's model_args and weights (dropout/block_size overridable)."""
    try:
        config = GPTConfig(**{**ckpt['model_args'], **overrides})
    except TypeError as e:
        raise ValueError(f"{source}: bad model_args ({e})") from None
    model = GPT(config)
    load_state_dict_checked(model, ckpt['model'], source)
    return model


# -------------------------------------------------------------------- downloads

def download(url, path, sha256=None, desc=None, retries=4, timeout=30, backoff=1.0, headers=None):
    """Fetch url to path (at once if it exists) with requests: streamed with a progress display, resumed and retried
    with backoff after a dropped connection or a 5xx, checked against Content-Length and sha256 where known. The
    bytes go to path.part, renamed only when complete, and kept after a failure for the next try to resume."""
    import hashlib
    import requests
    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + '.part')
    desc = desc or path.name
    for attempt in range(retries):
        try:
            have = part.stat().st_size if part.exists() else 0
            ask = {'Accept-Encoding': 'identity', **(headers or {}), **({'Range': f'bytes={have}-'} if have else {})}
            with requests.get(url, stream=True, timeout=timeout, headers=ask) as r:
                if r.status_code == 416:  # our .part already holds everything (or is bogus): start over
                    part.unlink()
                    raise requests.ConnectionError("range not satisfiable")
                if r.status_code >= 500 or r.status_code == 429:
                    raise requests.ConnectionError(f"HTTP {r.status_code}")
                if r.status_code >= 400:  # a missing file is FileNotFoundError: an optional file may be absent
                    error = FileNotFoundError if r.status_code == 404 else OSError
                    raise error(f"download of {url} failed: HTTP {r.status_code} {r.reason}; check the URL")
                if r.status_code != 206:
                    have = 0  # the server ignored our Range: take the whole body again
                length = r.headers.get('Content-Length')
                total = have + int(length) if length is not None else None
                got, t0, shown = have, time.time(), 0.0
                with open(part, 'ab' if have else 'wb') as f:
                    for chunk in r.iter_content(chunk_size=1 << 16):
                        f.write(chunk)
                        got += len(chunk)
                        if time.time() - shown > 0.5:
                            shown = time.time()
                            _progress(desc, got, total, (got - have) / max(shown - t0, 1e-9))
                _progress(desc, got, total, (got - have) / max(time.time() - t0, 1e-9), end='\n')
            if total is not None and part.stat().st_size != total:
                raise requests.ConnectionError(f"got {part.stat().st_size:,} of {total:,} bytes")
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            if attempt == retries - 1:
                raise OSError(f"download of {url} failed after {retries} tries ({_first_line(e)}); "
                              f"check your connection, or put the file at {path} yourself") from None
            print(f"\n{desc}: {_first_line(e)}; retrying in {backoff * 2 ** attempt:.0f}s", file=sys.stderr)
            time.sleep(backoff * 2 ** attempt)
    if sha256 is not None:
        h = hashlib.sha256()
        with open(part, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                h.update(block)
        if h.hexdigest() != sha256:
            part.unlink()
            raise OSError(f"download of {url} has sha256 {h.hexdigest()[:12]}..., expected {sha256[:12]}...; "
                          "the file changed upstream or was corrupted in transit")
    os.replace(part, path)
    return path


def _progress(desc, got, total, rate, end=''):
    pct = f" {100 * got / total:5.1f}% of {total / 1e6:,.1f} MB" if total else ""
    print(f"\r{desc}: {got / 1e6:,.1f} MB{pct} at {rate / 1e6:.1f} MB/s", end=end, file=sys.stderr, flush=True)


# -------------------------------------------------------------------- safetensors, GPT-2 weights

_ST_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
              'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
              'U8': torch.uint8, 'BOOL': torch.bool}
SAFETENSORS_MAX_HEADER = 100 * 2**20  # bytes; the hub's largest models need a few MB of names and offsets


def read_safetensors_header(path):
    """{name: (dtype, shape, byte offset in the file)} of a .safetensors file: 8 bytes of header length, a JSON header
    {name: {dtype, shape, data_offsets}}, then the raw tensor bytes (little-endian). Checked before a tensor is read:
    a header claimed past SAFETENSORS_MAX_HEADER is refused unread; each tensor must fill its bytes inside the file."""
    path = Path(path)
    try:
        with open(path, 'rb') as f:
            n = int.from_bytes(f.read(8), 'little')
            if n > SAFETENSORS_MAX_HEADER:
                raise ValueError(f"its header claims {n:,} bytes, over the {SAFETENSORS_MAX_HEADER:,} allowed")
            header = json.loads(f.read(n))
            size = os.fstat(f.fileno()).st_size
        where = {}
        for name, info in header.items():
            if name == '__metadata__':
                continue
            dtype, (begin, end) = _ST_DTYPES[info['dtype']], info['data_offsets']
            nbytes = math.prod(info['shape']) * dtype.itemsize
            if not (0 <= begin <= end and 8 + n + end <= size and end - begin == nbytes):
                raise ValueError(f"tensor {name} lies outside the file or has the wrong size")
            where[name] = (dtype, info['shape'], 8 + n + begin)
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise ValueError(f"{path} is not a valid safetensors file ({_first_line(e)}); "
                         "re-download or re-save it") from None
    return where


def load_safetensors(path):
    """{name: tensor} from a .safetensors file, memory-mapped copy-on-write: read once, never written."""
    where = read_safetensors_header(path)
    with open(path, 'rb') as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return {name: (torch.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=offset) if math.prod(shape)
                   else torch.empty(0, dtype=dtype)).view(shape) for name, (dtype, shape, offset) in where.items()}


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as a .safetensors file (atomically: temp file + rename)."""
    inv = {v: k for k, v in _ST_DTYPES.items()}
    header, offset = {'__metadata__': {'format': 'pt', **(metadata or {})}}, 0
    flat = {}
    for name, t in tensors.items():
        t = t.detach().to('cpu').contiguous()
        flat[name] = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        start, offset = offset, offset + flat[name].numel()
        header[name] = {'dtype': inv[t.dtype], 'shape': list(t.shape), 'data_offsets': [start, offset]}
    head = json.dumps(header, separators=(',', ':')).encode()
    head += b' ' * (-len(head) % 8)  # the data starts 8-byte aligned
    with atomic_write(path) as tmp, open(tmp, 'wb') as f:
        f.write(len(head).to_bytes(8, 'little'))
        f.write(head)
        for b in flat.values():
            f.write(b.numpy().data)


# GPT-2 was written with "Conv1D" layers that store Linear weights transposed: (in, out).
_CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
HF_ENDPOINT = os.environ.get('HF_ENDPOINT', 'https://huggingface.co')
CACHE_DIR = Path(os.environ.get('LLM_CACHE_DIR', Path.home() / '.cache' / 'llm-from-scratch'))


def fetch_gpt2(name):
    """The folder of OpenAI's GPT-2 weights (Hugging Face layout), downloaded once into CACHE_DIR/name."""
    folder = CACHE_DIR / name
    for file in ('config.json', 'model.safetensors'):
        download(f"{HF_ENDPOINT}/openai-community/{name}/resolve/main/{file}", folder / file, desc=f"{name}/{file}")
    return folder


def gpt2_state_dict(tensors):
    """Hugging Face GPT-2 tensors -> our state dict. Both naming styles load: the hub's
    (`h.0.attn.c_attn.weight`) and recent transformers' (`transformer.h.0...`); the causal
    mask buffers (`attn.bias`, `attn.masked_bias`) and the tied `lm_head.weight` are skipped."""
    sd = {}
    for name, t in tensors.items():
        name = name.removeprefix('transformer.')
        if name.split('.')[-2:] in (['attn', 'bias'], ['attn', 'masked_bias']) or name == 'lm_head.weight':
            continue
        sd['transformer.' + name] = t.t() if name.endswith(_CONV1D) else t
    if 'transformer.wte.weight' in sd:
        sd['lm_head.weight'] = sd['transformer.wte.weight']  # tied
    return sd


def gpt2_config(hf, tensors, path):
    """GPTConfig from GPT-2's config.json (hf), or where there is none, from the tensor shapes."""
    if 'n_layer' in hf:
        return GPTConfig(n_layer=hf['n_layer'], n_head=hf['n_head'], n_embd=hf['n_embd'], vocab_size=hf['vocab_size'],
                         block_size=hf.get('n_positions', hf.get('n_ctx')))
    names = [k.removeprefix('transformer.') for k in tensors]
    wte, wpe = (tensors.get(k, tensors.get('transformer.' + k)) for k in ('wte.weight', 'wpe.weight'))
    n_layer = len({k.split('.')[1] for k in names if k.startswith('h.')})
    fits = [p for p in PRESETS.values() if wte is not None and (p['n_embd'], p['n_layer']) == (wte.shape[1], n_layer)]
    if not fits:
        raise ValueError(f"{path}: no config.json beside the weights and the shapes match no GPT-2 size; "
                         "add config.json")
    return GPTConfig(**fits[0], vocab_size=wte.shape[0], block_size=wpe.shape[0])


# Published models by short name (any other hub id works too, e.g. meta-llama/Llama-3.2-3B-Instruct)
ALIASES = {
    'llama-3.2-1b': 'meta-llama/Llama-3.2-1B', 'llama-3.2-1b-instruct': 'meta-llama/Llama-3.2-1B-Instruct',
    'llama-3.2-3b': 'meta-llama/Llama-3.2-3B', 'llama-3.2-3b-instruct': 'meta-llama/Llama-3.2-3B-Instruct',
    'qwen3-0.6b': 'Qwen/Qwen3-0.6B', 'qwen3-0.6b-base': 'Qwen/Qwen3-0.6B-Base', 'qwen3-1.7b': 'Qwen/Qwen3-1.7B',
    'qwen2.5-0.5b': 'Qwen/Qwen2.5-0.5B', 'qwen2.5-0.5b-instruct': 'Qwen/Qwen2.5-0.5B-Instruct',
    'smollm2-135m': 'HuggingFaceTB/SmolLM2-135M', 'smollm2-135m-instruct': 'HuggingFaceTB/SmolLM2-135M-Instruct',
    'smollm2-360m': 'HuggingFaceTB/SmolLM2-360M', 'smollm2-360m-instruct': 'HuggingFaceTB/SmolLM2-360M-Instruct',
    'gemma-3-270m': 'google/gemma-3-270m', 'gemma-3-270m-it': 'google/gemma-3-270m-it',  # gated, as Llama's
    'gemma-3-1b': 'google/gemma-3-1b-pt', 'gemma-3-1b-it': 'google/gemma-3-1b-it',
}


def fetch_hub(repo, weights=True):
    """The folder of a hub model's config.json, tokenizer.json and weights, downloaded once into CACHE_DIR/<repo>;
    a marker file says a fetch was complete, so later runs ask the network nothing. Gated repos (Llama) need the
    license accepted on the hub and HF_TOKEN set."""
    folder = CACHE_DIR / repo.replace('/', '--')
    complete = folder / ('.complete' if weights else '.complete-tokenizer')
    if complete.is_file() or (folder / '.complete').is_file():
        return folder
    token = os.environ.get('HF_TOKEN')
    headers = {'Authorization': f'Bearer {token}'} if token else None

    def get(file, optional=False):
        try:
            url = f"{HF_ENDPOINT}/{repo}/resolve/main/{file}"
            return download(url, folder / file, desc=f"{repo}/{file}", headers=headers)
        except FileNotFoundError:
            if not optional:
                raise
        except OSError as e:
            if 'HTTP 401' in str(e) or 'HTTP 403' in str(e):
                raise OSError(f"{repo} is gated: accept its license on the hub, then set HF_TOKEN to an access token "
                              f"({'yours was refused' if token else 'none is set'})") from None
            raise
    get('config.json')
    get('tokenizer.json', optional=True)
    if weights:
        get('model.safetensors.index.json', optional=True)  # a sharded model's: it names the shards
        for file in weight_files(folder):
            get(str(file.relative_to(folder)))  # a shard's path as the index names it
    complete.write_text('')
    return folder


# The Llama family's tensor names for ours (block i: `transformer.h.{i}.X` <-> `model.layers.{i}.Y`).
# Ours fuse q, k, v into c_attn and gate, up into c_fc: their tensors are stacked along dim 0.
HF_NAMES = {
    'transformer.wte.weight': ['model.embed_tokens.weight'],
    'transformer.ln_f.weight': ['model.norm.weight'],
    'lm_head.weight': ['lm_head.weight'],
    'ln_1.weight': ['input_layernorm.weight'],
    'ln_2.weight': ['post_attention_layernorm.weight'],
    'attn.c_attn.weight': ['self_attn.q_proj.weight', 'self_attn.k_proj.weight', 'self_attn.v_proj.weight'],
    'attn.c_attn.bias': ['self_attn.q_proj.bias', 'self_attn.k_proj.bias', 'self_attn.v_proj.bias'],
    'attn.c_proj.weight': ['self_attn.o_proj.weight'],
    'attn.c_proj.bias': ['self_attn.o_proj.bias'],
    'attn.q_norm.weight': ['self_attn.q_norm.weight'],
    'attn.k_norm.weight': ['self_attn.k_norm.weight'],
    'mlp.c_fc.weight': ['mlp.gate_proj.weight', 'mlp.up_proj.weight'],
    'mlp.c_fc.bias': ['mlp.gate_proj.bias', 'mlp.up_proj.bias'],
    'mlp.c_proj.weight': ['mlp.down_proj.weight'],
    'mlp.c_proj.bias': ['mlp.down_proj.bias'],
}
# Gemma 3 norms each sublayer's input and output: its post_attention_layernorm is our ln_attn_out, not ln_2
GEMMA_NAMES = {**HF_NAMES, 'ln_2.weight': ['pre_feedforward_layernorm.weight'],
               'ln_attn_out.weight': ['post_attention_layernorm.weight'],
               'ln_mlp_out.weight': ['post_feedforward_layernorm.weight']}
ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM',
                 'gemma3_text': 'Gemma3ForCausalLM'}


def hf_names(name, sandwich_norm=False):
    """Our parameter name -> the hub's tensor names that make it up (Gemma's table for a sandwich-normed model)."""
    table = GEMMA_NAMES if sandwich_norm else HF_NAMES
    if name.startswith('transformer.h.'):
        i, rest = name.removeprefix('transformer.h.').split('.', 1)
        return [f'model.layers.{i}.{n}' for n in table[rest]]
    return table[name]


def gemma3_config(hf):
    """GPTConfig from a Gemma 3 text config.json: five sliding-window layers for each global one (layer_types, or
    the hub's sliding_window_pattern), each kind with its RoPE base (rope_theta + rope_local_base_freq, or
    transformers 5's rope_parameters per layer type), sandwich norms scaled by (1 + weight), GeGLU, QK-norm."""
    rope = hf.get('rope_parameters') or {}
    global_rope, local_rope = rope.get('full_attention') or {}, rope.get('sliding_attention') or {}
    for kind in (hf.get('rope_scaling') or {}, global_rope, local_rope):
        if kind.get('rope_type', kind.get('type', 'default')) != 'default':
            raise ValueError(f"RoPE scaling {kind.get('rope_type', kind.get('type'))!r} is not supported in Gemma 3 "
                             "(only none: the 270M and 1B models')")
    for key in ('final_logit_softcapping', 'attn_logit_softcapping', 'use_bidirectional_attention', 'attention_bias'):
        if hf.get(key):
            raise ValueError(f"{key} is not supported (Gemma 3's published text models have none)")
    if hf.get('hidden_activation', 'gelu_pytorch_tanh') != 'gelu_pytorch_tanh':
        raise ValueError(f"hidden_activation {hf['hidden_activation']!r} is not supported (only gelu_pytorch_tanh)")
    n_layer, pattern = hf['num_hidden_layers'], hf.get('sliding_window_pattern', hf.get('_sliding_window_pattern', 6))
    layer_types = hf.get('layer_types') or ['full_attention' if (i + 1) % pattern == 0 else 'sliding_attention'
                                            for i in range(n_layer)]
    return GPTConfig(
        block_size=hf['max_position_embeddings'], vocab_size=hf['vocab_size'], n_layer=n_layer,
        n_head=hf['num_attention_heads'], n_embd=hf['hidden_size'], n_kv_head=hf['num_key_value_heads'],
        head_dim=hf.get('head_dim', 256), bias=False, qk_norm=True,
        norm='rmsnorm_plus_one', norm_eps=hf.get('rms_norm_eps', 1e-6), pos_emb='rope',
        rope_theta=global_rope.get('rope_theta', hf.get('rope_theta', 1e6)),
        rope_local_theta=local_rope.get('rope_theta', hf.get('rope_local_base_freq', 1e4)),
        mlp='geglu', mlp_hidden=hf['intermediate_size'], tie_embeddings=hf.get('tie_word_embeddings', True),
        layer_types=layer_types, sliding_window=hf.get('sliding_window', 4096), sandwich_norm=True,
        scale_embeddings=True, query_pre_attn_scalar=hf.get('query_pre_attn_scalar', 256))


def llama_config(hf):
    """GPTConfig from a Llama / Qwen2 / Qwen3 config.json (rope_theta + rope_scaling, or transformers 5's
    rope_parameters), or Gemma 3's."""
    family = hf['model_type']
    if family == 'gemma3_text':
        return gemma3_config(hf)
    rope = hf.get('rope_scaling') or hf.get('rope_parameters') or {}
    rope_type = rope.get('rope_type', rope.get('type', 'default'))
    if rope_type not in ('default', 'llama3'):
        raise ValueError(f"RoPE scaling {rope_type!r} is not supported (only Llama 3's and none)")
    scaling = None
    if rope_type == 'llama3':
        scaling = {k: rope[k] for k in ('factor', 'low_freq_factor', 'high_freq_factor')}
        scaling['original_max_position_embeddings'] = rope.get('original_max_position_embeddings',
                                                               hf['max_position_embeddings'])
    if hf.get('use_sliding_window'):
        raise ValueError("sliding-window attention (use_sliding_window) is not supported")
    n_head = hf['num_attention_heads']
    return GPTConfig(
        block_size=hf['max_position_embeddings'], vocab_size=hf['vocab_size'], n_layer=hf['num_hidden_layers'],
        n_head=n_head, n_embd=hf['hidden_size'], n_kv_head=hf.get('num_key_value_heads') or n_head,
        head_dim=hf.get('head_dim') or hf['hidden_size'] // n_head,
        bias=bool(hf.get('attention_bias') and hf.get('mlp_bias')),
        qkv_bias=family == 'qwen2' or bool(hf.get('attention_bias')), qk_norm=family == 'qwen3',
        norm='rmsnorm', norm_eps=hf.get('rms_norm_eps', 1e-6), pos_emb='rope',
        rope_theta=hf.get('rope_theta', rope.get('rope_theta', 10000.0)), rope_scaling=scaling,
        mlp='swiglu', mlp_hidden=hf['intermediate_size'], tie_embeddings=hf.get('tie_word_embeddings', False))


class SafetensorsFiles:
    """The tensors of one or more .safetensors files, read on demand: the header of each file is
    parsed up front, the bytes of a tensor only when it is copied into the model, so loading holds the
    weights once (the book's memory-efficient loading bonus; a memory map would add the file's pages)."""

    def __init__(self, paths):
        self.where = {name: (path, *entry) for path in paths  # name -> (path, dtype, shape, byte offset)
                      for name, entry in read_safetensors_header(path).items()}

    def copy_into(self, name, out):
        """Read tensor `name` into the tensor `out` (its shape; its dtype, converting if they differ)."""
        path, dtype, shape, offset = self.where[name]
        if list(out.shape) != list(shape):
            raise ValueError(f"{name} has shape {tuple(shape)} in {path.name}, the model expects {tuple(out.shape)}")
        target = out if out.dtype == dtype else torch.empty(shape, dtype=dtype)
        with open(path, 'rb') as f:
            f.seek(offset)  # the header was checked: the bytes are there
            f.readinto(target.view(torch.uint8).numpy() if target.numel() else bytearray())
        if target is not out:
            out.copy_(target)


def weight_files(folder):  # one model.safetensors, or the shards its index names
    index = folder / 'model.safetensors.index.json'
    if not index.is_file():
        return [folder / 'model.safetensors']
    return [folder / s for s in sorted(set(json.loads(index.read_text(encoding='utf-8'))['weight_map'].values()))]


def empty_model(config, dtype):
    """A GPT on the CPU in dtype for the caller to fill: no memory or random init spent on the meta device."""
    with torch.device('meta'):
        model = GPT(config)
    model = model.to(dtype).to_empty(device='cpu')
    if config.tie_embeddings:  # to_empty gives every parameter new storage: tie again
        model.transformer.wte.weight = model.lm_head.weight
    if config.pos_emb == 'rope':
        model.init_rope()  # and leaves the RoPE tables empty
    return model


def load_llama(folder, hf, dtype=None, **overrides):
    """A Llama / Qwen2 / Qwen3 / SmolLM2 / Gemma 3 model from a Hugging Face folder, each parameter read from the
    files. Of a multimodal Gemma 3 (model_type gemma3), the text model: its vision tower is skipped, with a notice."""
    prefix = 'model.'  # where the text model's tensors are: model.layers.0..., or a multimodal one's
    if hf.get('model_type') == 'gemma3' and isinstance(hf.get('text_config'), dict):
        print(f"{folder.name}: a multimodal Gemma 3; loading its text model, skipping its vision tower",
              file=sys.stderr)
        hf, prefix = {'model_type': 'gemma3_text', **hf['text_config']}, None
    try:
        config = llama_config(hf)
    except KeyError as e:
        raise ValueError(f"{folder / 'config.json'} lacks {e}; is it a whole {hf['model_type']} config.json?") from None
    config.dropout = overrides.get('dropout', 0.0)
    files = SafetensorsFiles([p for p in weight_files(folder) if p.is_file()] or [folder / 'model.safetensors'])
    if prefix is None:  # the hub's files name it language_model.model.*, transformers 5's model.language_model.*
        prefix = next((p for p in ('language_model.model.', 'model.language_model.')
                       if p + 'embed_tokens.weight' in files.where), 'model.')
        files.where = {'model.' + k.removeprefix(prefix): v for k, v in files.where.items() if k.startswith(prefix)}
    embedding = HF_NAMES['transformer.wte.weight'][0]
    if embedding not in files.where:
        raise ValueError(f"{folder} lacks {embedding}; is it a complete {hf['model_type']} checkpoint?")
    file_dtype = files.where[embedding][1]  # the embedding's: norms may be float32
    model = empty_model(config, dtype or file_dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():  # the tied head is not listed twice
            parts = hf_names(name, config.sandwich_norm)
            missing = [p for p in parts if p not in files.where]
            if missing:
                raise ValueError(f"{folder} lacks {missing[0]}; is it a complete {hf['model_type']} checkpoint?")
            row = 0
            for part in parts:  # q, k, v (or gate, up) one after the other down the rows
                rows = files.where[part][2][0]
                files.copy_into(part, param[row:row + rows])
                row += rows
            if row != param.size(0):
                raise ValueError(f"{folder}: {', '.join(parts)} give {row} rows, the model's {name} has "
                                 f"{param.size(0)}; config.json does not match the weights")
    return model


def is_hub_name(name):
    """A short name (qwen3-0.6b) or a hub id (Qwen/Qwen3-0.6B) rather than a local path (out/ckpt.pt,
    ./my-model, a missing file: those stay paths, so their errors speak of files, not of the hub)."""
    name = str(name)
    if name.lower() in ALIASES:
        return True
    looks_like_file = (name.startswith(('.', '/', '~', '\\'))
                       or name.endswith(('.pt', '.safetensors', '.json', '.bin', '.model')))
    return name.count('/') == 1 and not looks_like_file and not Path(name).exists()


def pretrained_path(name_or_path, weights=True):
    """The local folder (or .safetensors file) of a GPT-2 size, hub name or path, downloaded first if need be."""
    name_or_path = str(name_or_path)
    if name_or_path in PRESETS:
        return fetch_gpt2(name_or_path)
    if is_hub_name(name_or_path):
        return fetch_hub(ALIASES.get(name_or_path.lower(), name_or_path), weights)
    path = Path(name_or_path)
    if not (path.is_dir() or (path.is_file() and path.suffix == '.safetensors')):
        raise FileNotFoundError(f"{name_or_path}: not a GPT-2 size ({', '.join(PRESETS)}), a model name "
                                f"({', '.join(list(ALIASES)[:3])}, ...), a hub id, a folder with "
                                "model.safetensors + config.json, or a .safetensors file")
    return path


def from_pretrained(name_or_path, dtype=None, **overrides):
    """A GPT-2 size, a Llama-family short name or hub id, or a local folder / .safetensors file in the Hugging Face
    layout. dtype: the weights' dtype (None: as the files hold them)."""
    bad = set(overrides) - {'block_size', 'dropout'}
    if bad:
        raise ValueError(f"from_pretrained can only override block_size and dropout, not {sorted(bad)}")
    path = pretrained_path(name_or_path)
    cfg_file = path / 'config.json' if path.is_dir() else path.parent / 'config.json'
    hf = json.loads(cfg_file.read_text(encoding='utf-8')) if cfg_file.is_file() else {'model_type': 'gpt2'}
    if hf.get('model_type') in (*ARCHITECTURES, 'gemma3'):
        model = load_llama(path if path.is_dir() else path.parent, hf, dtype, **overrides)
    elif hf.get('model_type') != 'gpt2':
        raise ValueError(f"{cfg_file}: model_type {hf.get('model_type')!r} is not supported "
                         f"(gpt2, {', '.join(ARCHITECTURES)}, gemma3)")
    else:
        weights = path / 'model.safetensors' if path.is_dir() else path
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found; a GPT-2 folder holds model.safetensors and config.json")
        tensors = load_safetensors(weights)
        try:
            config = gpt2_config(hf, tensors, path)
        except KeyError as e:
            raise ValueError(f"{cfg_file} lacks {e}; is it a complete gpt2 config.json?") from None
        config.dropout = overrides.get('dropout', 0.0)
        model = GPT(config)
        load_state_dict_checked(model, gpt2_state_dict(tensors), str(weights))
        if dtype is not None:
            model.to(dtype)
    block_size = overrides.get('block_size', model.config.block_size)
    if block_size > model.config.block_size:
        raise ValueError(f"block_size {block_size} is longer than the {model.config.block_size} positions "
                         "the weights have")
    if block_size < model.config.block_size:
        model.crop_block_size(block_size)
    return model


def hf_family(cfg):
    """The Hugging Face model_type whose layout holds a model of this config, or ValueError: GPT-2's, the Llama
    family's (llama, qwen2, qwen3: RoPE, RMSNorm, SwiGLU) or Gemma 3's, each with none of the others' parts."""
    gemma_parts = (cfg.sandwich_norm, cfg.scale_embeddings, cfg.query_pre_attn_scalar, cfg.layer_types,
                   cfg.rope_local_theta)
    plain = gemma_parts == (False, False, 0.0, None, 0.0)
    if plain and (cfg.pos_emb, cfg.norm, cfg.mlp) == ('learned', 'layernorm', 'gelu') and not cfg.qk_norm and \
            cfg.n_kv_head == cfg.n_head and cfg.head_dim * cfg.n_head == cfg.n_embd:
        return 'gpt2'
    if plain and (cfg.pos_emb, cfg.norm, cfg.mlp) == ('rope', 'rmsnorm', 'swiglu'):
        return 'qwen3' if cfg.qk_norm else 'qwen2' if cfg.qkv_bias and not cfg.bias else 'llama'
    if (cfg.pos_emb, cfg.norm, cfg.mlp, cfg.sandwich_norm, cfg.scale_embeddings, cfg.qk_norm, cfg.bias or cfg.qkv_bias,
            cfg.rope_scaling) == ('rope', 'rmsnorm_plus_one', 'geglu', True, True, True, False, None):
        return 'gemma3_text'
    raise ValueError("this model mixes the parts of GPT-2 (learned positions, LayerNorm, GELU, a key/value head per "
                     "head), the Llama family (RoPE, RMSNorm, SwiGLU) and Gemma 3: no published layout holds it")


def save_pretrained(model, folder, tokenizer_json=None):
    """Write config.json + model.safetensors as transformers writes this family (GPT2LMHeadModel: Conv1D weights
    transposed back, zero biases where this model has none; Llama/Qwen: the hub's names, q/k/v and gate/up split
    apart again), plus tokenizer.json when given its text, so the folder loads here and in transformers."""
    cfg, family = model.config, hf_family(model.config)  # checked before anything is written
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_json is not None:
        save_text(folder / 'tokenizer.json', tokenizer_json)
    if family != 'gpt2':
        return save_llama(model, folder, family)
    tensors = {}
    for name, t in merged_state_dict(model).items():
        if name == 'transformer.wte.weight':
            t = t[:cfg.vocab_size].contiguous()  # without the padding rows: the real vocabulary
        if name != 'lm_head.weight':  # tied to wte
            tensors[name] = t.t() if name.endswith(_CONV1D) else t
    if not cfg.bias:  # the layout has biases everywhere; zeros are the same model
        for name, m in model.named_modules():
            if name != 'lm_head' and isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is None:
                n = m.out_features if isinstance(m, nn.Linear) else m.normalized_shape[0]
                tensors[name + '.bias'] = torch.zeros(n, dtype=m.weight.dtype)
    save_safetensors(tensors, folder / 'model.safetensors')
    hf_config = dict(architectures=['GPT2LMHeadModel'], model_type='gpt2', vocab_size=cfg.vocab_size,
                     n_positions=cfg.block_size, n_ctx=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_inner=None, activation_function='gelu_new', resid_pdrop=cfg.dropout,
                     embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, layer_norm_epsilon=1e-5,
                     initializer_range=0.02, bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1,
                     tie_word_embeddings=True)
    save_text(folder / 'config.json', json.dumps(hf_config, indent=2))


def save_llama(model, folder, family):
    cfg, gemma = model.config, family == 'gemma3_text'
    sd = merged_state_dict(model)
    tensors = {}
    for name, t in sd.items():
        if name == 'lm_head.weight' and cfg.tie_embeddings:
            continue
        if name in ('transformer.wte.weight', 'lm_head.weight'):
            t = t[:cfg.vocab_size]  # without the padding rows
        parts = hf_names(name, gemma)
        sizes = model.transformer.h[0].attn.sizes if len(parts) == 3 else [t.size(0) // len(parts)] * len(parts)
        for part, piece in zip(parts, t.split(sizes)):
            tensors[part] = piece.contiguous()
    save_safetensors(tensors, folder / 'model.safetensors')
    dtype = str(sd['transformer.wte.weight'].dtype).removeprefix('torch.')
    hf = dict(architectures=[ARCHITECTURES[family]], model_type=family, vocab_size=cfg.vocab_size,
              hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
              num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
              max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, hidden_act='silu',
              rope_scaling=dict(rope_type='llama3', **cfg.rope_scaling) if cfg.rope_scaling else None,
              rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.bias,
              mlp_bias=cfg.bias, attention_dropout=0.0, use_sliding_window=False, torch_dtype=dtype)
    if gemma:  # the hub's keys for Gemma 3 (gemma-3-270m's config.json)
        for key in ('hidden_act', 'mlp_bias', 'use_sliding_window'):
            del hf[key]
        hf.update(hidden_activation='gelu_pytorch_tanh', attention_bias=False,
                  query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim, sliding_window=cfg.sliding_window,
                  layer_types=cfg.layer_types or ['full_attention'] * cfg.n_layer,
                  rope_local_base_freq=cfg.rope_local_theta or cfg.rope_theta, final_logit_softcapping=None,
                  attn_logit_softcapping=None)
    save_text(folder / 'config.json', json.dumps(hf, indent=2))


def load_pretrained(init_from, dtype=None, out_dir='out', scratch=None, **overrides):
    """(model, info) of what every script's --init_from names: scratch (GPT(scratch), a GPTConfig), resume
    (out_dir/ckpt.pt), a checkpoint of ours (a ckpt.pt or its folder), a GPT-2 size, a Llama-family name or hub
    id, or Hugging Face-layout weights (a folder or .safetensors file). overrides (dropout, block_size) apply to
    published weights; a checkpoint takes dropout and a smaller block_size. info: {'tokenizer': what get_tokenizer
    takes, 'prompt_style': a fine-tuned checkpoint's instruction template or None, 'checkpoint': ours (less its
    weights, which are in the model) or None}."""
    if init_from == 'scratch':
        if scratch is None:
            raise ValueError("--init_from=scratch: this script starts from trained weights; give a checkpoint, "
                             "a GPT-2 size or a model name")
        return GPT(scratch), {'tokenizer': default_tokenizer(scratch), 'prompt_style': None, 'checkpoint': None}
    path = Path(out_dir) / 'ckpt.pt' if init_from == 'resume' else Path(init_from)
    ours = path.suffix == '.pt' or (path / 'ckpt.pt').is_file()
    if init_from == 'resume' or (init_from not in PRESETS and not is_hub_name(init_from) and ours):
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, str(path), **{k: v for k, v in overrides.items() if k == 'dropout'})
        del ckpt['model']  # a second copy of every weight, which a caller keeping info would hold on to
        if overrides.get('block_size', model.config.block_size) < model.config.block_size:
            model.crop_block_size(overrides['block_size'])
        return model, {'tokenizer': ckpt.get('tokenizer', 'gpt2'), 'prompt_style': ckpt.get('prompt_style'),
                       'checkpoint': ckpt}
    model = from_pretrained(init_from, dtype=dtype, **overrides)
    folder = pretrained_path(init_from)
    folder = folder if folder.is_dir() else folder.parent
    tokenizer = str(folder) if (folder / 'tokenizer.json').is_file() else default_tokenizer(model.config)
    return model, {'tokenizer': tokenizer, 'prompt_style': None, 'checkpoint': None}


def default_tokenizer(config):  # of a model that names none: our byte tokenizer's 257 ids, else GPT-2's
    return 'bytes' if config.vocab_size == 257 else 'gpt2'

