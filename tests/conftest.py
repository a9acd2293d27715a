"""Shared test setup: the repo on sys.path, GPT-2's BPE files from ../shared, a local HTTP server, our scripts run
as a user runs them (or in this process, for their error lines), a time limit per test, and under CI=true no
skipped test."""
import _thread
import contextlib
import faulthandler
import http.server
import io
import json
import os
import re
import runpy
import signal
import subprocess
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
TEST_TIMEOUT = int(os.environ.get('TEST_TIMEOUT', 600))  # seconds one test may take before it fails with a traceback
PLATFORM_SKIP = re.compile(r'windows|win32|macos|\bmps\b|cuda|gpu', re.IGNORECASE)  # what CI's Linux CPU is not


@pytest.fixture(autouse=True)
def time_limit(request):
    """A test that hangs (a loop waiting on a child, a socket) is interrupted after TEST_TIMEOUT seconds, as Ctrl+C
    would: the run stops there, naming the test and the line it hung on, instead of eating CI's 90 minutes. A real
    SIGINT (where there is one), so that a blocking call returns; should even that go unheard, faulthandler ends
    the process a minute later with every thread's traceback."""
    main = threading.main_thread().ident

    def expire():
        print(f"\n{request.node.nodeid}: over {TEST_TIMEOUT} s, interrupted", file=sys.__stderr__, flush=True)
        signal.pthread_kill(main, signal.SIGINT) if hasattr(signal, 'pthread_kill') else _thread.interrupt_main()
    timer = threading.Timer(TEST_TIMEOUT, expire)
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(TEST_TIMEOUT + 60, exit=True, file=sys.__stderr__)
    yield
    timer.cancel()
    faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped test fails: CI installs everything the tests need, so a skip there means a test
    that did not run (a missing package, compiler or file). Skips for a platform CI is not (Windows, macOS, MPS,
    CUDA) stay skips."""
    report = (yield).get_result()
    if report.skipped and os.environ.get('CI') == 'true' and not hasattr(report, 'wasxfail'):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not PLATFORM_SKIP.search(reason):
            report.outcome, report.longrepr = 'failed', f"skipped under CI=true, where every test must run: {reason}"


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


@pytest.fixture(scope='session')
def pydoc_data(tmp_path_factory):
    """Python's docs as byte tokens (prepare_data.py's pydoc data set, no download), prepared once for the whole
    session and shared by the tests that train on it: read from it, never write into it."""
    from prepare_data import prepare
    return prepare('pydoc', data_dir=tmp_path_factory.mktemp('pydoc_data') / 'pydoc', quiet=True)


DEVICE_SCRIPTS = ('train.py', 'sample.py', 'finetune_classify.py', 'finetune_instruct.py', 'bench.py', 'eval.py')


def script_argv(script, args):
    """The command line of one of our scripts as the tests run it. The tests mean CPU and float32 (exact
    comparisons), also on a machine with a GPU or a bfloat16 CPU: the scripts that choose a device get
    --device=cpu --dtype=float32 first, which a test's own arguments override."""
    first = ['--device=cpu', '--dtype=float32'] if script in DEVICE_SCRIPTS else []
    return [str(ROOT / script), *first, *map(str, args)]


def run_script(script, *args, cwd=None, timeout=300):
    """Run one of our scripts as a user would, in a new interpreter; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, *script_argv(script, args)], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout)


def run_here(script, *args):
    """Run one of our scripts inside this process, as `python script args` would (runpy, as __main__, in a fresh
    namespace), for the tests of its one-line errors: no new interpreter and torch import for each. sys.exit's
    message goes to stderr as the interpreter would print it; an uncaught exception propagates (a traceback is
    never a one-line error). Returns a CompletedProcess (text), as run_script does."""
    argv, out, err = script_argv(script, args), io.StringIO(), io.StringIO()
    saved, sys.argv, code = sys.argv, argv, 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(argv[0], run_name='__main__')
    except SystemExit as e:
        code = 1 if isinstance(e.code, str) else e.code or 0
        if isinstance(e.code, str):
            err.write(e.code + '\n')
    finally:
        sys.argv = saved
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


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


@pytest.fixture(scope='session')
def big_random_model(tmp_path_factory):
    """(folder, weights' bytes) of one ~110 MB bfloat16 Qwen3-like model (12 layers; its embedding 31% of it,
    Qwen3-0.6B's 26%) in the Hugging Face layout, made once for the memory tests: read it, never write into it."""
    from model import GPTConfig
    cfg = GPTConfig(block_size=512, vocab_size=32768, n_layer=12, n_head=8, n_kv_head=4, head_dim=64, n_embd=512,
                    qk_norm=True, norm='rmsnorm', pos_emb='rope', mlp='swiglu', mlp_hidden=1536, bias=False)
    folder = tmp_path_factory.mktemp('big_random_model') / 'm'
    return folder, save_big_random_model(cfg, folder)


# a line for the memory tests' subprocess scripts: the process's own peak resident bytes (Linux). ru_maxrss would
# carry the pytest parent's peak over the exec, and a bound on its growth would then hold whatever the script does
PEAK_RSS = "peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024"
