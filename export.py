"""
Take your model where people talk to models: GGUF for llama.cpp, Ollama and LM Studio, or a Hugging Face folder
for transformers (and every tool that reads one).
    python export.py --to=model.gguf                                   # out/ckpt.pt (train.py's), float16
    python export.py --out_dir=out-instruct --to=chat.gguf --type=q8_0  # a fine-tuned checkpoint, 8-bit
    python export.py --init_from=qwen3-0.6b --to=qwen3.gguf             # any model sample.py takes
    python export.py --to=my-model                                     # a folder in the Hugging Face layout
GGUF is ggml's one-file format (github.com/ggml-org/ggml, docs/gguf.md), written here by hand as weights.py writes
safetensors: a header, key-value metadata (the architecture's numbers, the tokenizer, the chat template), a table
of tensors, then their bytes. Beside a .gguf goes an Ollama Modelfile with the same chat format as sample.py --chat.
"""
import json
import struct
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from configurator import configure, die
from model import merged_state_dict, rope_frequencies
from weights import atomic_write, hf_family, load_pretrained, save_json, save_pretrained, save_text
from tokenizer import (ALPACA_OPENING, CHAT_FORMATS, GPT2_PATTERN, GPT4_PATTERN, PROMPT_STYLES, ROLES, chat_style_of,
                       get_tokenizer, response_end_id, split_pattern, tokenizer_json)

init_from = 'resume'  # resume (out_dir/ckpt.pt), gpt2..., qwen3-0.6b, a hub id, a ckpt.pt, or a HF-layout folder
out_dir = 'out'
to = ''  # PATH.gguf: one GGUF file (+ PATH.Modelfile for Ollama); any other path: a Hugging Face folder
type = 'f16'  # GGUF storage of the matrices: f16, bf16, f32, or q8_0 (llama.cpp's 8-bit blocks); norms stay f32
chat_style = 'auto'  # the chat template written: auto (as sample.py --chat picks), alpaca, phi3, llama3, chatml
name = ''  # the model's name in the GGUF (default: the file's)

# -------------------------------------------------------------------- the chat template, as other programs read it


def template_parts(style):
    """(start, {role: (text before the content, text after)}, the assistant's header) of a chat format."""
    start, turns, header, _ = CHAT_FORMATS[style]
    return start, {role: tuple(turns[role].split('{}')) for role in ROLES}, header


def jinja_template(style):
    """The chat format as a Jinja chat template (Hugging Face's tokenizer_config.json, GGUF's tokenizer.chat_template):
    rendered with add_generation_prompt it gives format_chat's text exactly. Every literal is a quoted expression,
    so the renderers' trim_blocks / lstrip_blocks cannot eat a newline."""
    q = json.dumps
    start, turns, header = template_parts(style)
    opening = (f"{{% if not messages or messages[0]['role'] != 'system' %}}{{{{ {q(ALPACA_OPENING)} }}}}{{% endif %}}"
               if style == 'alpaca' else '')
    if style == 'gemma':  # a system message opens the first user turn
        opening = ("{% if messages|length > 1 and messages[0]['role'] == 'system' and messages[1]['role'] == 'user' %}"
                   "{% set messages = [{'role': 'user', 'content': messages[0]['content'] + '\\n\\n' + "
                   "messages[1]['content']}] + messages[2:] %}{% endif %}")
    body = ''.join(f"{{% {'if' if i == 0 else 'elif'} message['role'] == {q(role)} %}}"
                   f"{{{{ {q(turns[role][0])} + message['content'] + {q(turns[role][1])} }}}}"
                   for i, role in enumerate(ROLES))
    return (f"{{{{ {q(start)} }}}}{opening}{{% for message in messages %}}{body}{{% endif %}}{{% endfor %}}"
            f"{{% if add_generation_prompt %}}{{{{ {q(header)} }}}}{{% endif %}}")


def ollama_template(style):
    """The same format in Ollama's TEMPLATE syntax (Go's text/template over .Messages)."""
    q = json.dumps
    start, turns, header = template_parts(style)
    opening = (f'{{{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}}}{{{{ {q(ALPACA_OPENING)} }}}}'
               '{{ end }}' if style == 'alpaca' else '')
    body = ''.join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role {q(role)} }}}}'
                   f'{{{{ {q(turns[role][0])} }}}}{{{{ .Content }}}}{{{{ {q(turns[role][1])} }}}}'
                   for i, role in enumerate(ROLES))
    if style == 'gemma':  # a system message, then a user message: one user turn
        folded = ('and (eq (index $.Messages 0).Role "system") (gt (len $.Messages) 1) '
                  '(eq (index $.Messages 1).Role "user")')
        body = (f'{{{{ if and (eq $i 0) ({folded}) }}}}{{{{ {q(turns["user"][0])} }}}}{{{{ .Content }}}}'
                '{{ "\\n\\n" }}'
                f'{{{{ else if and (eq $i 1) ({folded}) }}}}{{{{ .Content }}}}{{{{ {q(turns["user"][1])} }}}}'
                f'{{{{ else }}}}{body}{{{{ end }}}}')
    return (f'{{{{ {q(start)} }}}}{opening}{{{{ range $i, $m := .Messages }}}}{body}{{{{ end }}}}{{{{ end }}}}'
            f'{{{{ {q(header)} }}}}')


def special_tokens(tokenizer, style):
    """The ids of end-of-text (eos), of the chat format's end of a turn (eot) and of begin-of-text (bos: Llama 3's
    <|begin_of_text|>, else end-of-text, as GPT-2 has it)."""
    begin = tokenizer.encode('<|begin_of_text|>') if style == 'llama3' else []
    return {'eos': tokenizer.eot_id, 'eot': response_end_id(tokenizer, style),
            'bos': begin[0] if len(begin) == 1 else tokenizer.eot_id}


# -------------------------------------------------------------------- the Hugging Face folder

def export_folder(model, tokenizer, style, folder):
    """config.json + model.safetensors (weights.save_pretrained), tokenizer.json, and the tokenizer_config.json /
    generation_config.json that give transformers our chat format and where a reply ends."""
    ids = special_tokens(tokenizer, style)
    text = lambda id: tokenizer.decode([id])  # noqa: E731
    save_pretrained(model, folder, tokenizer_json=tokenizer_json(tokenizer))
    save_json(folder / 'tokenizer_config.json', {
        'tokenizer_class': 'PreTrainedTokenizerFast', 'chat_template': jinja_template(style),
        'bos_token': text(ids['bos']), 'eos_token': text(ids['eot']), 'pad_token': text(ids['eos']),
        'add_bos_token': False, 'add_eos_token': False, 'clean_up_tokenization_spaces': False,
        'model_max_length': model.config.block_size})
    save_json(folder / 'generation_config.json', {
        'bos_token_id': ids['bos'], 'eos_token_id': sorted({ids['eos'], ids['eot']}), 'pad_token_id': ids['eos']})


# -------------------------------------------------------------------- GGUF

GGUF_VERSION, ALIGNMENT = 3, 32
# ggml's tensor types: (id, bytes per block, values per block); general.file_type says which the matrices use
GGML_TYPES = {'f32': (0, 4, 1), 'f16': (1, 2, 1), 'q8_0': (8, 34, 32), 'bf16': (30, 2, 1)}
FILE_TYPES = {'f32': 0, 'f16': 1, 'q8_0': 7, 'bf16': 32}
# GGUF's metadata value types
UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5
# tokenizer.json pre-tokenizers that llama.cpp has a twin of (its tokenizer.ggml.pre), checked as the regex we split
# with; a split llama.cpp lacks would give other tokens than the model was trained on
BYTE_LEVEL = {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True, 'use_regex': False}


def split_then_bytes(regex):
    return {'type': 'Sequence', 'pretokenizers': [
        {'type': 'Split', 'pattern': {'Regex': regex}, 'behavior': 'Isolated', 'invert': False}, BYTE_LEVEL]}


LLAMA_CPP_PRE = [
    ('gpt-2', {**BYTE_LEVEL, 'use_regex': True}),  # GPT-2's own
    ('gpt-2', split_then_bytes(GPT2_PATTERN)),
    ('llama-bpe', split_then_bytes(GPT4_PATTERN)),  # Llama 3's, and our own BPE's
    ('qwen2', split_then_bytes(GPT4_PATTERN.replace(r'\p{N}{1,3}', r'\p{N}'))),  # Qwen2, 2.5, 3: single digits
    ('smollm', {'type': 'Sequence', 'pretokenizers': [{'type': 'Digits', 'individual_digits': True},
                                                       {**BYTE_LEVEL, 'use_regex': True}]}),
]


def gguf_family(config):
    """llama.cpp's architecture for this model (its Hugging Face family's name), or ValueError."""
    family = hf_family(config)  # gpt2, llama, qwen2, qwen3 or gemma3_text; or ValueError for a mix of parts
    if family == 'gemma3_text':
        raise ValueError("Gemma 3 is not written as GGUF here: export it as a Hugging Face folder, which llama.cpp's "
                         "convert_hf_to_gguf.py reads")
    if family != 'llama' and config.rope_scaling:
        raise ValueError(f"GGUF's {family} architecture has no Llama 3 RoPE scaling")
    return family


def gguf_vocabulary(tokenizer, n_vocab):
    """(tokens, token types, merges, llama.cpp's pre-tokenizer name) from the tokenizer's tokenizer.json: the
    strings spelled in GPT-2's byte alphabet as llama.cpp's BPE reads them; ids the model has but the tokenizer
    lacks become unused [PADn] tokens."""
    config = json.loads(tokenizer_json(tokenizer))
    model = config['model']
    pattern = split_pattern(config.get('pre_tokenizer'), tokenizer.name)
    pre = next((name for name, known in LLAMA_CPP_PRE if split_pattern(known, name) == pattern), None)
    if pre is None and model['merges']:
        raise ValueError(f"the {tokenizer.name} tokenizer splits text in a way llama.cpp has no pre-tokenizer for; "
                         "export it as a Hugging Face folder instead")
    tokens, types = [f'[PAD{i}]' for i in range(n_vocab)], [TOKEN_UNUSED] * n_vocab
    entries = [(id, token, TOKEN_NORMAL) for token, id in model['vocab'].items()]
    entries += [(t['id'], t['content'], TOKEN_CONTROL if t.get('special', True) else TOKEN_USER_DEFINED)
                for t in config.get('added_tokens') or []]
    largest = max(id for id, _, _ in entries)
    if largest >= n_vocab:
        raise ValueError(f"the {tokenizer.name} tokenizer has token ids up to {largest:,} but the model only "
                         f"{n_vocab:,} rows; this model was trained with another tokenizer")
    for id, token, kind in entries:
        tokens[id], types[id] = token, kind
    merges = [m if isinstance(m, str) else ' '.join(m) for m in model['merges']]
    return tokens, types, merges, pre or 'gpt-2'  # no merges: every split gives the same tokens


def gguf_metadata(model, tokenizer, style, family, file_type, model_name):
    """GGUF's key-value pairs: [(key, value type, value)] (an ARRAY's type is (ARRAY, element type))."""
    c = model.config
    tokens, types, merges, pre = gguf_vocabulary(tokenizer, c.vocab_size)
    ids = special_tokens(tokenizer, style)
    kv = [('general.architecture', STRING, family), ('general.name', STRING, model_name),
          ('general.file_type', UINT32, FILE_TYPES[file_type]), ('general.quantization_version', UINT32, 2),
          (f'{family}.vocab_size', UINT32, c.vocab_size), (f'{family}.context_length', UINT32, c.block_size),
          (f'{family}.embedding_length', UINT32, c.n_embd), (f'{family}.feed_forward_length', UINT32, c.mlp_hidden),
          (f'{family}.block_count', UINT32, c.n_layer), (f'{family}.attention.head_count', UINT32, c.n_head)]
    if family == 'gpt2':
        kv.append(('gpt2.attention.layer_norm_epsilon', FLOAT32, c.norm_eps))
    else:
        kv += [(f'{family}.attention.head_count_kv', UINT32, c.n_kv_head),
               (f'{family}.attention.key_length', UINT32, c.head_dim),
               (f'{family}.attention.value_length', UINT32, c.head_dim),
               (f'{family}.rope.dimension_count', UINT32, c.head_dim),
               (f'{family}.rope.freq_base', FLOAT32, c.rope_theta),
               (f'{family}.attention.layer_norm_rms_epsilon', FLOAT32, c.norm_eps)]
    kv += [('tokenizer.ggml.model', STRING, 'gpt2'), ('tokenizer.ggml.pre', STRING, pre),
           ('tokenizer.ggml.tokens', (ARRAY, STRING), tokens), ('tokenizer.ggml.token_type', (ARRAY, INT32), types),
           ('tokenizer.ggml.merges', (ARRAY, STRING), merges),
           ('tokenizer.ggml.bos_token_id', UINT32, ids['bos']), ('tokenizer.ggml.eos_token_id', UINT32, ids['eos']),
           ('tokenizer.ggml.eot_token_id', UINT32, ids['eot']),
           ('tokenizer.ggml.padding_token_id', UINT32, ids['eos']),
           # llama.cpp would put a begin-of-text token (for llama-bpe) before every prompt: ours never saw one
           ('tokenizer.ggml.add_bos_token', BOOL, False), ('tokenizer.ggml.add_eos_token', BOOL, False),
           ('tokenizer.chat_template', STRING, jinja_template(style))]
    return kv


def permute_for_llama_cpp(w, heads):
    """Rows of q (or k) from the Hugging Face layout, where RoPE rotates the two halves of each head, to
    llama.cpp's llama, which rotates adjacent pairs: (heads, 2, half, in) -> (heads, half, 2, in)."""
    return w.reshape(heads, 2, w.size(0) // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# our block's modules -> llama.cpp's (block i: transformer.h.{i}.X -> blk.{i}.Y). The Llama family's fused q/k/v
# and gate/up projections are split apart (attn_q, attn_k, attn_v; ffn_gate, ffn_up); gpt2 keeps qkv fused.
GGUF_NAMES = {'ln_1': 'attn_norm', 'ln_2': 'ffn_norm', 'attn.c_attn': 'attn_qkv', 'attn.c_proj': 'attn_output',
              'mlp.c_fc': 'ffn_up', 'mlp.c_proj': 'ffn_down',
              'attn.q_norm': 'attn_q_norm', 'attn.k_norm': 'attn_k_norm'}


def block_tensors(model, sd, i, family):
    """[(GGUF name, tensor)] of block i."""
    c, prefix, out = model.config, f'transformer.h.{i}.', []
    for key, t in sd.items():
        if not key.startswith(prefix):
            continue
        module, part = key.removeprefix(prefix).rsplit('.', 1)
        name = f'blk.{i}.{GGUF_NAMES[module]}'
        if family != 'gpt2' and module == 'attn.c_attn':
            q, k, v = t.split(model.transformer.h[i].attn.sizes)
            if family == 'llama':
                q, k = permute_for_llama_cpp(q, c.n_head), permute_for_llama_cpp(k, c.n_kv_head)
            out += [(f'blk.{i}.attn_q.{part}', q), (f'blk.{i}.attn_k.{part}', k), (f'blk.{i}.attn_v.{part}', v)]
        elif family != 'gpt2' and module == 'mlp.c_fc':
            gate, up = t.chunk(2)
            out += [(f'blk.{i}.ffn_gate.{part}', gate), (f'blk.{i}.ffn_up.{part}', up)]
        else:
            out.append((f'{name}.{part}', t))
            if family == 'gpt2' and part == 'weight' and prefix + module + '.bias' not in sd:
                out.append((f'{name}.bias', torch.zeros(t.size(0))))  # llama.cpp's gpt2 has every bias
    return out


def gguf_tensors(model, family):
    """[(GGUF name, tensor)] of the model in llama.cpp's names and layouts (the vocabulary's padding rows cut)."""
    c = model.config
    sd = merged_state_dict(model)  # LoRA folded in
    out = [('token_embd.weight', sd['transformer.wte.weight'][:c.vocab_size])]
    if family == 'gpt2':
        out.append(('position_embd.weight', sd['transformer.wpe.weight']))
    for i in range(c.n_layer):
        out += block_tensors(model, sd, i, family)
    out.append(('output_norm.weight', sd['transformer.ln_f.weight']))
    if family == 'gpt2':
        out.append(('output_norm.bias', sd.get('transformer.ln_f.bias', torch.zeros(c.n_embd))))
    if not c.tie_embeddings:
        out.append(('output.weight', sd['lm_head.weight'][:c.vocab_size]))
    if c.rope_scaling:  # Llama 3's longer context: llama.cpp divides each frequency by its factor
        out.append(('rope_freqs.weight', rope_frequencies(replace(c, rope_scaling=None)) / rope_frequencies(c)))
    return out


def storage(t, file_type):
    """The ggml type a tensor is stored in: norms, biases and RoPE factors float32 (as llama.cpp's converter keeps
    them); matrices the file's type, except q8_0 rows not a whole number of 32-value blocks: float16."""
    if t.dim() == 1 or file_type == 'f32':
        return 'f32'
    return 'f16' if file_type == 'q8_0' and t.size(-1) % 32 else file_type


def q8_0(rows):
    """llama.cpp's Q8_0 of float32 rows (n, k) as bytes: each block of 32 values as a float16 scale d = max|x| / 127
    and 32 int8 values round(x / d), rounded half away from zero as C's roundf (ggml's quantize_row_q8_0_ref).
    In numpy: torch's elementwise ops start threads for each, ten times slower at this size on a busy machine."""
    blocks = rows.numpy().reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide='ignore'):
        x = blocks * np.where(d > 0, np.float32(1) / d, np.float32(0))
    q = np.trunc(x + np.copysign(np.float32(0.5), x)).astype(np.int8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1).tobytes()


def tensor_bytes(t, kind):
    """The tensor as ggml stores it, 64K values at a time: the float32 working copies stay a few MB (the whole
    embedding of Qwen3-0.6B would be 620 MB), and a small model's export holds little beside its weights."""
    t = t.reshape(-1, t.size(-1)) if t.dim() > 1 else t.reshape(1, -1)
    rows = max(1, 2**16 // t.size(1))
    for i in range(0, t.size(0), rows):
        chunk = t[i:i + rows].float()
        if kind == 'q8_0':
            yield q8_0(chunk)
        else:
            dtype = {'f32': torch.float32, 'f16': torch.float16, 'bf16': torch.bfloat16}[kind]
            yield chunk.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()


def pack_value(kind, value):
    """One metadata value in GGUF's little-endian encoding (strings: uint64 length + UTF-8 bytes)."""
    if isinstance(kind, tuple):  # (ARRAY, element type): element type, count, the elements
        return struct.pack('<IQ', kind[1], len(value)) + b''.join(pack_value(kind[1], v) for v in value)
    if kind == STRING:
        raw = value.encode('utf-8')
        return struct.pack('<Q', len(raw)) + raw
    return struct.pack({UINT32: '<I', INT32: '<i', FLOAT32: '<f', BOOL: '<?'}[kind], value)


def write_gguf(path, metadata, tensors, file_type):
    """GGUF version 3: 'GGUF', version, tensor count, key-value count; the key-values; each tensor's name,
    dimensions (ggml's order: innermost first), type and offset; then the data, each tensor aligned to 32 bytes."""
    infos, offset = [], 0
    for name, t in tensors:
        kind = storage(t, file_type)
        type_id, block_bytes, block_values = GGML_TYPES[kind]
        infos.append((name, t, kind, offset))
        size = t.numel() // block_values * block_bytes
        offset += size + -size % ALIGNMENT
    header = [b'GGUF', struct.pack('<IQQ', GGUF_VERSION, len(tensors), len(metadata))]
    header += [pack_value(STRING, key) + struct.pack('<I', kind[0] if isinstance(kind, tuple) else kind)
               + pack_value(kind, value) for key, kind, value in metadata]
    for name, t, kind, start in infos:
        dims = list(reversed(t.shape))
        header.append(pack_value(STRING, name) + struct.pack(f'<I{len(dims)}QIQ', len(dims), *dims,
                                                             GGML_TYPES[kind][0], start))
    shown = time.time()
    with atomic_write(path) as tmp, open(tmp, 'wb') as f:
        f.write(b''.join(header))
        f.write(bytes(-f.tell() % ALIGNMENT))
        data_start = f.tell()
        for i, (name, t, kind, start) in enumerate(infos):
            for chunk in tensor_bytes(t, kind):
                f.write(chunk)
            f.write(bytes(-f.tell() % ALIGNMENT))
            if time.time() - shown > 0.5 or i == len(infos) - 1:
                shown = time.time()
                print(f"\rwriting {path.name}: {(f.tell() - data_start) / 1e6:,.0f} of {offset / 1e6:,.0f} MB", end='',
                      file=sys.stderr, flush=True)
        print(file=sys.stderr)


def modelfile(gguf_path, tokenizer, style):
    """An Ollama Modelfile: the weights, our chat format as its TEMPLATE, and a stop at the end of a turn."""
    stop, template = tokenizer.decode([response_end_id(tokenizer, style)]), ollama_template(style)
    assert '"""' not in template  # the Modelfile quotes it so
    return (f"FROM ./{gguf_path.name}\nTEMPLATE \"\"\"{template}\"\"\"\n"
            f"PARAMETER stop {json.dumps(stop)}\n")


# llama.cpp gives a model whose general.name holds one of these another model's token rules (Phi-3's expect a </s>
# token: loading ours then fails with "unordered_map::at")
LLAMA_CPP_NAME_RULES = ('phi3', 'phi-3', 'modern-bert')


def export_gguf(model, tokenizer, style, path):
    family, model_name = gguf_family(model.config), name or path.stem
    if any(rule in model_name.lower() for rule in LLAMA_CPP_NAME_RULES):
        raise ValueError(f"the name {model_name!r} makes llama.cpp treat the model as Phi-3 or ModernBERT, and fail "
                         f"to load it; give another --name (or file name)")
    metadata = gguf_metadata(model, tokenizer, style, family, type, model_name)
    with torch.no_grad():
        write_gguf(path, metadata, gguf_tensors(model, family), type)
    save_text(path.with_suffix('.Modelfile'), modelfile(path, tokenizer, style))
    return family


def check_destination():
    """The flags, checked before any model is loaded: nothing is written when one is wrong."""
    if type not in GGML_TYPES:
        die(f"--type={type}: use one of {', '.join(GGML_TYPES)}")
    if not to:
        die("--to is missing: give PATH.gguf for llama.cpp / Ollama, or a folder for the Hugging Face layout")
    if chat_style != 'auto' and chat_style not in PROMPT_STYLES:
        die(f"--chat_style={chat_style}: use auto, {', '.join(PROMPT_STYLES)}")
    path = Path(to).expanduser()
    if not path.parent.is_dir():
        die(f"--to={to}: the folder {path.parent} does not exist; create it first")
    if path.suffix != '.gguf' and path.exists() and not path.is_dir():
        die(f"--to={to} is a file: give PATH.gguf, or a folder for the Hugging Face layout")
    return path


def size_of(path):
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


if __name__ == '__main__':
    configure(globals())
    path = check_destination()
    try:
        model, info = load_pretrained(init_from, out_dir=out_dir)
        tokenizer = get_tokenizer(info['tokenizer'])
        style = chat_style_of(tokenizer, info['prompt_style']) if chat_style == 'auto' else chat_style
        response_end_id(tokenizer, style)  # the tokenizer must know how a reply ends
        if path.suffix == '.gguf':
            family = export_gguf(model.eval(), tokenizer, style, path)
        else:
            export_folder(model.eval(), tokenizer, style, path)
    except (OSError, ValueError) as e:
        die(e)
    print(f"wrote {path} ({size_of(path):,.1f} MB; chat format {style})")
    if path.suffix == '.gguf':
        print(f"{family}, {type}; run it:\n"
              f"  llama.cpp:  llama-cli -m {path} --jinja        (or llama-simple -m {path} -n 64 \"Once upon\")\n"
              f"  Ollama:     ollama create my-model -f {path.with_suffix('.Modelfile')} && ollama run my-model")
    else:
        print(f"load it: AutoModelForCausalLM.from_pretrained({str(path)!r}), AutoTokenizer.from_pretrained(...), "
              f"or python sample.py --init_from={path}")
