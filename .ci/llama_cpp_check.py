"""
export.py checked by the programs that read its files (too slow to build for CI; RESULTS.md, "Export"):
llama.cpp's llama-simple continues a prompt with our greedy tokens, its llama-tokenize gives our ids, and Go's
text/template (Ollama's) renders each Modelfile TEMPLATE as format_chat. From the checkout's root:
    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/l
    tar xzf /tmp/l/llama_cpp_python-*.tar.gz -C /tmp/l
    cd /tmp/l/llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        && cmake --build build -j2 --target llama-simple llama-tokenize llama-cli   # 10-20 min on 2 cores
    apt-get install -y golang-go                                             # for the Ollama template (optional)
    python .ci/llama_cpp_check.py /tmp/l/llama_cpp_python-*/vendor/llama.cpp/build/bin [--out_dir=out ...]
With no model flags it makes random models of every family and tokenizer (tests/fixtures' tokenizers) to check;
--out_dir=DIR / --init_from=X check those (train.py's checkpoints: --out_dir=out --out_dir=out-llama-style).
"""
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'tests'))
from conftest import FIXTURES, spread_weights  # noqa: E402
from export import ollama_template  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import PROMPT_STYLES, format_chat, get_tokenizer  # noqa: E402
from weights import load_pretrained, save_checkpoint  # noqa: E402

PROMPT = "Note: the default value of\nthe 2nd argument is 10; for example,"
TEXTS = ["def foo(x):\n    return x ** 2  # comment\n\n\nclass Bar:\n        pass\n",
         "windows\r\nline ends\r\n\r\n  and\ttabs\t\t", "runs of spaces:     five,  two,          ten   \n   \n",
         "Numbers: 1 12 123 1234 12345 3.14159 1,000,000 and 2024-05-20; x2 = y**10 +99999999",
         "Hello, world! I'm sure they'll say it's fine, don't you think? YOU'RE RIGHT, I'D SAY.",
         "Unicode: Café naïve 你好，世界 😀👍🏽 Россия", "before<|endoftext|>after <|endoftext|>"]
LLAMA = dict(n_kv_head=2, norm='rmsnorm', pos_emb='rope', mlp='swiglu', mlp_hidden=96, bias=False)
MODELS = {  # name: (tokenizer, GPTConfig fields)
    'gpt2-bpe': ('bpe', dict(padded_vocab_size=704)), 'gpt2-gpt2': ('gpt2', {}), 'gpt2-bytes': ('bytes', {}),
    'llama3': ('llama3', dict(LLAMA, rope_theta=500000.0, rope_scaling=dict(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64))),
    'llama-untied': ('llama3', dict(LLAMA, tie_embeddings=False)), 'smollm2': ('smollm2', LLAMA),
    'qwen2': ('qwen2', dict(LLAMA, qkv_bias=True, rope_theta=1e6)),
    'qwen3': ('qwen2', dict(LLAMA, qk_norm=True, head_dim=32, rope_theta=1e6)),
}


def spec(name):
    if name in ('gpt2', 'bytes'):
        return name
    return {'name': name, 'json': (FIXTURES / 'tokenizers' / name / 'tokenizer.json').read_text(encoding='utf-8')}


def random_checkpoints(folder):
    for name, (tokenizer, fields) in MODELS.items():
        tok = get_tokenizer(spec(tokenizer))
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=256, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=64, **fields))
        save_checkpoint(folder / name / 'ckpt.pt', spread_weights(model, 8.0), tok.spec, {})
    return [f'--out_dir={folder / name}' for name in MODELS]


def export(flag, gguf):
    subprocess.run([sys.executable, str(ROOT / 'export.py'), flag, f'--to={gguf}', '--type=f32'], check=True,
                   capture_output=True)


def load(flag):
    """(model, tokenizer) of --out_dir=DIR or --init_from=X, as export.py loads them."""
    key, value = flag[2:].split('=', 1)
    model, info = load_pretrained('resume' if key == 'out_dir' else value, out_dir=value)
    return model.eval(), get_tokenizer(info['tokenizer'])


def same_greedy_text(bin, model, tok, gguf):
    """Our 24 greedy tokens (model.generate, as sample.py --temperature=0) against llama-simple's, as bytes."""
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        ours = model.generate(ids, 24, temperature=0.0)[0, ids.size(1):].tolist()
    printed = subprocess.run([f'{bin}/llama-simple', '-m', gguf, '-n', '24', PROMPT], capture_output=True).stdout
    if not printed.startswith(PROMPT.encode()):
        return f'DIFFERENT: {printed[:80]!r} (something before the prompt)'
    printed = printed[len(PROMPT.encode()):].rstrip(b'\n')
    # llama-simple prints each piece with printf("%s") (a NUL byte ends it) and stops at an end-of-turn token
    n = next((i for i in range(len(ours) + 1) if tok.decode_bytes(ours[:i]).replace(b'\0', b'') == printed), None)
    if n == 24:
        return f'SAME {tok.decode(ours)[:40]!r}'
    if n is not None and ours[n] in (tok.eot_id, *tok.encode('<|im_end|><|eot_id|>')):
        return f'SAME for {n} tokens, then llama.cpp stops at end-of-turn id {ours[n]}'
    # where they part: our top two logits there (float32 sums in another order flip a near tie)
    n = max(i for i in range(len(ours) + 1) if printed.startswith(tok.decode_bytes(ours[:i]).replace(b'\0', b'')))
    with torch.no_grad():
        top = model(torch.tensor([ids[0].tolist() + ours[:n]]))[0][0, -1].float().topk(2).values
    return (f'DIFFERENT from token {n} on, where our top two logits are {top[0]:.4f} and {top[1]:.4f}: llama.cpp '
            f'{printed[:50]!r}, ours {tok.decode_bytes(ours)[:50]!r}')


def same_ids(bin, tok, gguf, folder):
    equal = 0
    for text in TEXTS:
        text = text.replace('<|endoftext|>', tok.decode([tok.eot_id]))
        (folder / 'text.txt').write_text(text, encoding='utf-8', newline='')
        out = subprocess.run([f'{bin}/llama-tokenize', '-m', gguf, '-f', folder / 'text.txt', '--no-escape', '--ids',
                              '--log-disable'], capture_output=True, text=True).stdout
        equal += json.loads(out.strip().splitlines()[-1]) == tok.encode(text)
    return f'{equal} of {len(TEXTS)} texts give our ids'


def llama_cpp_templates(bin, flags, folder):
    """llama-cli (if built: --target llama-cli) logs its Jinja engine's rendering of a 4-message example chat; each
    style on the first model whose tokenizer has its turns' tokens."""
    if not Path(f'{bin}/llama-cli').is_file():
        return print('llama.cpp chat templates: not checked (build the llama-cli target)')
    chat = [{'role': 'system', 'content': 'You are a helpful assistant'}, {'role': 'user', 'content': 'Hello'},
            {'role': 'assistant', 'content': 'Hi there'}, {'role': 'user', 'content': 'How are you?'}]
    for style in PROMPT_STYLES:
        for flag in flags:
            if subprocess.run([sys.executable, str(ROOT / 'export.py'), flag, f'--to={folder / "t.gguf"}',
                               f'--chat_style={style}'], capture_output=True).returncode == 0:
                break
        else:
            print(f"llama.cpp chat template {style:7s} not checked: no model's tokenizer has its tokens")
            continue
        log = subprocess.run([f'{bin}/llama-cli', '-m', folder / 't.gguf', '-p', 'x', '-n', '1', '-st', '-lv', '4'],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, errors='replace').stderr
        shown = re.search(r"example_format: '(.*?)'\n\d", log, re.S)
        same = shown is not None and shown.group(1) == format_chat(chat, style)
        print(f"llama.cpp chat template {style:7s} {'renders as format_chat' if same else 'DIFFERENT'}")


def ollama_templates(folder):
    if not shutil.which('go'):
        return print('Ollama templates: not checked (no go; apt-get install golang-go)')
    (folder / 'go.mod').write_text('module render\ngo 1.19\n')
    (folder / 'main.go').write_text(
        'package main\nimport ("encoding/json"; "os"; "text/template")\n'
        'type Message struct { Role string; Content string }\n'
        'func main() {\n  text, _ := os.ReadFile(os.Args[1])\n  var m []Message\n'
        '  if err := json.Unmarshal([]byte(os.Args[2]), &m); err != nil { panic(err) }\n'
        '  t := template.Must(template.New("").Parse(string(text)))\n'
        '  if err := t.Execute(os.Stdout, map[string]any{"Messages": m}); err != nil { panic(err) }\n}\n')
    subprocess.run(['go', 'build', '-o', 'render', '.'], cwd=folder, check=True)
    chat = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'What is 2+2?\nSay "it".'},
            {'role': 'assistant', 'content': '4'}, {'role': 'user', 'content': 'And 3 + 3?'}]
    for style in PROMPT_STYLES:
        (folder / 't.tmpl').write_text(ollama_template(style))
        same = [subprocess.run([folder / 'render', folder / 't.tmpl', json.dumps(m)], capture_output=True,
                               text=True).stdout == format_chat(m, style)
                for m in (chat, chat[1:], chat[1:2], chat[:1])]
        print(f"Ollama template {style:7s} {sum(same)} of 4 conversations render as format_chat")


if __name__ == '__main__':
    bin, flags = sys.argv[1], sys.argv[2:]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        flags = flags or random_checkpoints(folder)
        for flag in flags:
            gguf = folder / 'm.gguf'
            export(flag, gguf)
            model, tok = load(flag)
            print(f"{flag:40s} greedy: {same_greedy_text(bin, model, tok, gguf)}; "
                  f"tokenizer: {same_ids(bin, tok, gguf, folder)}")
        llama_cpp_templates(bin, flags, folder)
        ollama_templates(folder)
