"""Shared test setup: the repo on sys.path, GPT-2's BPE files from ../shared, a local HTTP server."""
import http.server
import json
import os
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / 'shared'
sys.path.insert(0, str(ROOT))
if (SHARED / 'tiktoken_cache').is_dir():
    os.environ.setdefault('TIKTOKEN_CACHE_DIR', str(SHARED / 'tiktoken_cache'))
FIXTURES = ROOT / 'tests' / 'fixtures'


def spread_weights(model, factor=10):
    """The model with its matrices spread `factor`x: GPT-2's small init repeats one token whatever it reads,
    which would hide a cache, a mask or a window that feeds it the wrong context; spread, its next token
    depends on the context."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(factor)
    return model


def gpt2_bpe_available():
    try:
        import tiktoken
        tiktoken.get_encoding('gpt2')
        return True
    except Exception:
        return False


needs_gpt2_bpe = pytest.mark.skipif(not gpt2_bpe_available(),
                                    reason="GPT-2 BPE files unavailable: no ../shared/tiktoken_cache and no network")


class FakeServer:
    """An http.server on 127.0.0.1 serving `routes` {path: bytes}, with misbehaviours to order:
    `truncate_once` paths send half their body then drop the connection, the first time
    (`truncate_always`: every time); POST answers come from `post_routes` {path: bytes or fn(json)}.
    `fail_once` paths answer 500 the first time; `no_range` paths ignore Range headers."""

    def __init__(self):
        self.routes, self.truncate_once, self.truncate_always, self.fail_once, self.no_range = {}, set(), set(), set(), set()
        self.requests, self.authorizations, self.status = [], [], {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get('Range')))
                server.authorizations.append(self.headers.get('Authorization'))
                if self.path in server.status:  # e.g. 401 for a gated repo
                    self.send_error(server.status[self.path])
                    return
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                if self.path in server.fail_once:
                    server.fail_once.discard(self.path)
                    self.send_error(500)
                    return
                start = 0
                rng = self.headers.get('Range')
                if rng and self.path not in server.no_range:
                    start = int(rng.split('=')[1].split('-')[0])
                    self.send_response(206)
                    self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
                else:
                    self.send_response(200)
                self.send_header('Content-Length', str(len(body) - start))
                self.end_headers()
                if self.path in server.truncate_once or self.path in server.truncate_always:
                    server.truncate_once.discard(self.path)
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

            def do_POST(self):  # a fake Ollama /api/chat: answers with post_routes[path], records the JSON
                body = self.rfile.read(int(self.headers.get('Content-Length', 0)))
                server.posts.append((self.path, json.loads(body or b'null')))
                answer = server.post_routes.get(self.path)
                if answer is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header('Content-Type', 'application/x-ndjson')
                self.end_headers()
                self.wfile.write(answer(server.posts[-1][1]) if callable(answer) else answer)

        self.post_routes, self.posts = {}, []
        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


DEVICE_SCRIPTS = ('train.py', 'sample.py', 'finetune_classify.py', 'finetune_instruct.py', 'bench.py')


def run_script(script, *args, cwd=None, timeout=300):
    """Run one of our scripts as a user would; returns the CompletedProcess (text). The tests mean
    CPU and float32 (exact comparisons), also on a machine with a GPU or a bfloat16 CPU: the
    scripts that choose a device get --device=cpu --dtype=float32 first, which a test's own
    arguments override."""
    import subprocess
    first = ['--device=cpu', '--dtype=float32'] if script in DEVICE_SCRIPTS else []
    return subprocess.run([sys.executable, str(ROOT / script), *first, *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *needles):
    """A bad input ends with exit code != 0 and one 'error: ...' line naming the problem."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith('error: ') and 'Traceback' not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def make_llama_folder(folder, family, spread=8.0):
    """A random Qwen- or Llama-3-shaped model saved in the Hugging Face layout with a tokenizer.json from
    tests/fixtures/tokenizers (small vocabularies with the families' own special tokens). spread: the
    matrices times this, so that an untrained model does not just repeat one token."""
    tokenizer_json = (FIXTURES / 'tokenizers' / family / 'tokenizer.json').read_text(encoding='utf-8')
    from model import GPT, GPTConfig
    from tokenizer import get_tokenizer
    from weights import save_pretrained
    tok = get_tokenizer({'name': family, 'json': tokenizer_json})
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                          norm='rmsnorm', pos_emb='rope', mlp='swiglu', mlp_hidden=96, bias=False,
                          qkv_bias=family == 'qwen2')).eval()
    spread_weights(model, spread)
    save_pretrained(model, folder, tokenizer_json=tokenizer_json)
    return model, tok


def save_big_random_model(config, folder):
    """A bfloat16 model of this shape with N(0, 1) weights, made directly in place (no float32 copy) and saved
    in the Hugging Face layout, for the memory tests; returns its weights' bytes."""
    from weights import empty_model, save_pretrained
    model = empty_model(config, torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    save_pretrained(model, folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


# a line for the memory tests' subprocess scripts: the process's own peak resident bytes (Linux). ru_maxrss would
# carry the pytest parent's peak over the exec, and a bound on its growth would then hold whatever the script does
PEAK_RSS = "peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024"
