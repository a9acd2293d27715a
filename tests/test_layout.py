"""The promises of the project's form (DESIGN.md): model.py copies alone into another project, model.py +
weights.py as a pair, `import tokenizer` loads no torch, and every top-level file stays narrow and short."""
import ast
import shutil
import subprocess
import sys

from conftest import FIXTURES, ROOT

TOP_LEVEL = sorted(ROOT.glob('*.py'))


def run_in(folder, code):
    """code run by a fresh Python in folder, which is on its path (no PYTHONPATH: not the repo, not tests/)."""
    return subprocess.run([sys.executable, '-E', '-c', code], cwd=folder, capture_output=True, text=True, timeout=120)


def test_model_py_copied_alone_builds_trains_and_generates(tmp_path):
    shutil.copy(ROOT / 'model.py', tmp_path)
    done = run_in(tmp_path, '''
import torch
from model import GPT, GPTConfig
model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
idx = torch.randint(0, 50, (2, 8))
logits, loss = model(idx, idx)
loss.backward()
print(model.generate(idx, 4, temperature=0).shape)
''')
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == 'torch.Size([2, 12])'


def test_model_and_weights_copied_together_load_and_save_published_weights(tmp_path):
    for name in ('model.py', 'weights.py'):
        shutil.copy(ROOT / name, tmp_path)
    done = run_in(tmp_path, f'''
import torch
from weights import from_pretrained, save_pretrained
model = from_pretrained({str(FIXTURES / 'tiny-qwen3')!r})
save_pretrained(model, 'again')
back = from_pretrained('again')
idx = torch.tensor([[1, 2, 3]])
print(torch.equal(model(idx)[0], back(idx)[0]))
''')
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == 'True'


def test_import_tokenizer_loads_no_torch(tmp_path):
    done = run_in(ROOT, '''
import sys
import tokenizer
tokenizer.get_tokenizer('bytes').encode('hi')
print('torch' in sys.modules)
''')
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == 'False'


def test_model_and_weights_import_nothing_else_of_ours():
    ours = {path.stem for path in TOP_LEVEL}
    for name, allowed in (('model.py', set()), ('weights.py', {'model'}), ('quantize.py', {'model'}),
                          ('configurator.py', set())):
        imported = set()
        for node in ast.walk(ast.parse((ROOT / name).read_text(encoding='utf-8'))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split('.')[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split('.')[0])
        assert imported & ours <= allowed, (name, imported & ours)


def test_every_top_level_file_is_narrow_and_short():
    for path in TOP_LEVEL:
        lines = path.read_text(encoding='utf-8').splitlines()
        wide = [i + 1 for i, line in enumerate(lines) if len(line) > 120]
        assert not wide, f"{path.name}: lines over 120 columns: {wide[:10]}"
        assert len(lines) <= 750, f"{path.name}: {len(lines)} lines; past 750 a second job has moved in"
        for node in ast.walk(ast.parse('\n'.join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 100, f"{path.name}: {node.name} is {length} lines long"
