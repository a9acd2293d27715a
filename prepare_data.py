"""
Text -> tokens -> token shards (book chapter 2), the input of train.py.
    python prepare_data.py                                   # Python's own docs, byte tokens: no download
    python prepare_data.py --dataset=verdict --tokenizer=gpt2
    python prepare_data.py --tokenizer=bpe --vocab_size=4096   # train our own BPE on the training split first
    python prepare_data.py --input=my_texts/ --tokenizer=path/to/Llama-3.2-1B --data_dir=data/mine
    python prepare_data.py --dataset=fineweb10B --num_shards=10   # llm.c's GPT-2 tokens, 100M per shard
    python prepare_data.py --dataset=arithmetic   # worked additions (shards) + answer-only problems for GRPO
Shards use the llm.c / modded-nanogpt format (a 256 x int32 header: magic 20240520, version 1, token count; then
uint16 tokens), so shards made here train there and theirs train here; a vocabulary above 65,536 ids (Llama 3,
Qwen) writes version 2, the same with uint32 tokens. meta.json beside them names the tokenizer (and a
tokenizer.json copy, when it has one); the tokenizers themselves are in tokenizer.py.
"""
import functools
import hashlib
import json
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

from configurator import configure, die
from tokenizer import GPT4_PATTERN, get_tokenizer, train_bpe
from weights import atomic_write, download, save_text

dataset = 'pydoc'  # pydoc | verdict | shakespeare | fineweb10B | arithmetic (ignored when --input is given)
input = ''  # a UTF-8 text file, or a folder of .txt files (one document each)
tokenizer = 'bytes'  # bytes (256 bytes + end-of-text) | gpt2 | bpe (trained here) | a hub id, folder or tokenizer.json
vocab_size = 4096  # --tokenizer=bpe: 256 bytes + merges + end-of-text
tokenizer_max_chars = 20_000_000  # --tokenizer=bpe: learn from at most this many characters of the training split
data_dir = ''  # where the shards go; default data/<dataset> (or data/<input name>)
raw_dir = ''  # where downloaded raw files are kept (and first looked for); default: data_dir
val_fraction = 0.1  # the last 10% of the text is the validation split, as in the book
num_shards = 1  # fineweb10B: how many 100M-token training shards to fetch (up to 103)
num_workers = 0  # tokenizer processes for large inputs; 0 = one per CPU core

MAGIC, HEADER_INTS = 20240520, 256
SHARD_DTYPES = {1: np.uint16, 2: np.uint32}  # header version: token type (2 is ours, for vocabularies above 65,536)
SHARD_TOKENS = 100_000_000  # at most this many tokens per shard (llm.c's size)
PIECE_CHARS = 1 << 20  # large texts are tokenized in pieces of about this many characters

DATASETS = {  # name: (url, file name, sha256)
    'verdict': ('https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/'
                'the-verdict.txt', 'the-verdict.txt',
                'b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f'),
    'shakespeare': ('https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt',
                    'tinyshakespeare.txt', '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'),
}
FINEWEB_URL = 'https://huggingface.co/datasets/kjj0/fineweb10B-gpt2/resolve/main/'


# -------------------------------------------------------------------- shards

def token_dtype(vocab_size):
    """uint16 while every id fits (llm.c's shards, version 1), else uint32 (version 2)."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def write_shard(path, tokens):
    """tokens -> llm.c shard at path, atomically: version 1 (uint16), or version 2 for a uint32 array."""
    tokens = np.asarray(tokens)
    version = 2 if tokens.dtype == np.uint32 else 1
    if version == 1 and tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << 16):
        raise ValueError(f"{path}: token ids above 65,535 need a uint32 array (a version 2 shard)")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, version, len(tokens))
    with atomic_write(path) as tmp, open(tmp, 'wb') as f:
        f.write(header.tobytes())
        f.write(tokens.astype(SHARD_DTYPES[version], copy=False).tobytes())


def read_shard(path):
    """An llm.c shard's tokens as a read-only memory map (uint16, or uint32 for version 2); ValueError if corrupt."""
    path = Path(path)
    size = path.stat().st_size
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS) if size >= 4 * HEADER_INTS else np.zeros(3, np.int32)
    if header[0] != MAGIC or int(header[1]) not in SHARD_DTYPES:
        raise ValueError(f"{path} is not a token shard (bad header); re-run prepare_data.py")
    dtype, n = SHARD_DTYPES[int(header[1])], int(header[2])
    width = np.dtype(dtype).itemsize
    if size != 4 * HEADER_INTS + width * n:
        raise ValueError(f"{path} is corrupt: its header promises {n:,} tokens but the file holds "
                         f"{(size - 4 * HEADER_INTS) // width:,}; re-run prepare_data.py")
    return np.memmap(path, dtype=dtype, mode='r', offset=4 * HEADER_INTS, shape=(n,))


def find_shards(data_dir, split):
    """Sorted shard paths of a split ('train' or 'val') in data_dir."""
    return sorted(p for p in Path(data_dir).glob('*.bin') if split in p.name)


def read_meta(data_dir):
    """meta.json of a data folder; shards without one are GPT-2 tokens (as llm.c's)."""
    path = Path(data_dir) / 'meta.json'
    if not path.is_file():
        return {'tokenizer': 'gpt2', 'vocab_size': 50257, 'eot_id': 50256}
    return json.loads(path.read_text(encoding='utf-8'))


def data_tokenizer(data_dir):
    """A prepared data folder's tokenizer: by name, or the tokenizer.json beside the shards (checked against them)."""
    meta = read_meta(data_dir)
    if 'tokenizer_file' not in meta:
        return get_tokenizer(meta['tokenizer'])
    path = Path(data_dir) / meta['tokenizer_file']
    if not path.is_file():
        raise OSError(f"{path} is missing: meta.json names it as the tokenizer of the shards; re-run prepare_data.py")
    tok = get_tokenizer({'name': meta['tokenizer'], 'json': path.read_text(encoding='utf-8')})
    if tok.name != meta['tokenizer']:
        raise ValueError(f"{path} is not the tokenizer the shards were made with ({meta['tokenizer']}); "
                         "re-run prepare_data.py")
    return tok


class ShardWriter:
    """One split's tokens as <prefix>_<split>_<index>.bin shards of at most SHARD_TOKENS tokens (one in memory)."""

    def __init__(self, folder, prefix, split, dtype=np.uint16):
        self.folder, self.prefix, self.split, self.dtype = folder, prefix, split, dtype
        self.buf, self.n_buf, self.paths, self.total = [], 0, [], 0

    def add(self, tokens):
        while len(tokens):
            take = tokens[:SHARD_TOKENS - self.n_buf]
            self.buf.append(take)
            self.n_buf += len(take)
            tokens = tokens[len(take):]
            if self.n_buf == SHARD_TOKENS:
                self.flush()

    def flush(self):
        if self.n_buf or not self.paths:  # an empty split still gets one (empty) shard
            path = self.folder / f"{self.prefix}_{self.split}_{len(self.paths):06d}.bin"
            write_shard(path, np.concatenate(self.buf) if self.buf else np.zeros(0, self.dtype))
            self.paths.append(path.name)
            self.total += self.n_buf
        self.buf, self.n_buf = [], 0


# -------------------------------------------------------------------- documents -> pieces

def list_documents(dataset, input, raw_dir):
    """[(name, size in bytes, loader)] of the documents to tokenize, in order."""
    if input:
        path = Path(input)
        if path.is_dir():
            files = sorted(p for p in path.rglob('*.txt') if p.is_file())
            if not files:
                raise ValueError(f"{path} holds no .txt files; give a text file or a folder of .txt files")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"--input={input}: no such file or folder")
        return [(str(p), p.stat().st_size, p) for p in files]
    if dataset == 'pydoc':
        from pydoc_data.topics import topics  # the help() texts of every CPython install
        return [(f"pydoc:{k}", len(v.encode('utf-8')), v) for k, v in sorted(topics.items())]
    if dataset in DATASETS:
        url, name, sha = DATASETS[dataset]
        path = download(url, Path(raw_dir) / name, sha256=sha)
        return [(str(path), path.stat().st_size, path)]
    raise ValueError(f"unknown dataset {dataset!r}; use pydoc, verdict, shakespeare, fineweb10B, or --input=PATH")


STDLIB_SKIP = {'test', 'tests', 'idlelib', 'turtledemo', 'lib2to3', 'site-packages', 'dist-packages'}


@functools.cache  # the same on every call in a process, and parsing the whole library takes seconds
def stdlib_docstrings():
    """[(name, size, text)]: the docstrings of every module of this Python's standard library, a document a file,
    tests left out: English about Python wherever Python's sources are (some trimmed installs lack them: none)."""
    import ast
    lib = Path(sysconfig.get_paths()['stdlib'])
    docs = []
    for path in sorted(lib.rglob('*.py')):
        parts = path.relative_to(lib).parts
        if any(p in STDLIB_SKIP or p.startswith('test') for p in parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):  # a file for another Python version, or unreadable
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        texts = [d for node in ast.walk(tree) if isinstance(node, kinds) and (d := ast.get_docstring(node))]
        if texts:
            text = '\n\n'.join(texts)
            docs.append((f"stdlib:{'/'.join(parts)}", len(text.encode('utf-8')), text))
    return tuple(docs)


def read_text(source):
    """A document's text: given as a string, or read from a UTF-8 file (a byte-order mark dropped)."""
    if isinstance(source, str):
        return source
    try:
        text = source.read_text(encoding='utf-8')
    except UnicodeDecodeError as e:
        raise ValueError(f"{source} is not valid UTF-8 (byte {e.start}); convert it to UTF-8 first") from None
    return text.removeprefix('\ufeff')


def split_pieces(text, size=PIECE_CHARS):
    """A long text cut into pieces of about `size` characters, each ending in a newline before a non-space
    character, where BPE would split anyway: the pieces' tokens are the whole's."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = start + size
        while cut < len(text) and not (text[cut - 1] == '\n' and not text[cut].isspace()):
            cut += 1
        if cut == len(text):  # no safe place left: the rest is one piece
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def iter_pieces(docs, val_fraction, train_only=0):
    """(text, split, ends_document) in order. The last val_fraction of the bytes of all
    documents together is 'val', cut at a line boundary (the book splits its text so too);
    the first train_only documents are training text that does not count (nor move the cut)."""
    extra = sum(size for _, size, _ in docs[:train_only])
    total = sum(size for _, size, _ in docs[train_only:])
    boundary, seen = extra + total * (1 - val_fraction), 0
    for _, size, source in docs:
        text = read_text(source)
        if seen < boundary < seen + size:  # the train/val cut falls inside this document
            cut = int(len(text) * (boundary - seen) / size)
            nl = text.rfind('\n', 0, cut)
            cut = nl + 1 if nl > 0 else cut
            parts = [(text[:cut], 'train', False), (text[cut:], 'val', True)]
        else:
            parts = [(text, 'train' if seen < boundary else 'val', True)]
        seen += size
        for part, split, ends in parts:
            pieces = split_pieces(part)
            for i, piece in enumerate(pieces):
                yield piece, split, ends and i == len(pieces) - 1


_worker_tokenizer = None


def _start_worker(spec):  # runs once in each worker process (module-level functions: spawn-safe)
    global _worker_tokenizer
    _worker_tokenizer = get_tokenizer(spec)


def encode_piece(piece, tokenizer=None):
    """(text, split, ends a document) -> (token ids, split, ends, characters); workers use _start_worker's tokenizer."""
    text, split, ends = piece
    tokenizer = tokenizer or _worker_tokenizer
    return np.array(tokenizer.encode(text), dtype=token_dtype(tokenizer.vocab_size)), split, ends, len(text)


def train_tokenizer(docs, val_fraction, train_only, vocab_size, max_chars, quiet=False):
    """Our own BPE, learned from the first max_chars characters of the training split, never the validation text."""
    def training_text():
        seen = 0
        for text, split, _ in iter_pieces(docs, val_fraction, train_only):
            if split == 'val' or seen >= max_chars:  # the validation split comes last
                return
            yield text[:max_chars - seen]
            seen += len(text)
    return get_tokenizer({'name': f"bpe{vocab_size}", 'json': train_bpe(training_text(), vocab_size, quiet=quiet)})


def fingerprint(docs, tokenizer, val_fraction, docstrings_stamp=None):
    """What the shards are made from: the documents (name, size, modification time), the tokenizer, the
    split and the shard format; and, for pydoc, which Python's docstrings join the training text."""
    h = hashlib.sha256(json.dumps([tokenizer, val_fraction, SHARD_TOKENS, MAGIC]).encode())
    if docstrings_stamp is not None:  # hashed as a document of that name whose text is the stamp
        h.update(b"stdlib docstrings|0|0" + docstrings_stamp.encode('utf-8'))
    for name, size, source in docs:
        mtime = source.stat().st_mtime_ns if isinstance(source, Path) else 0
        h.update(f"{name}|{size}|{mtime}".encode())
        if isinstance(source, str):
            h.update(source.encode('utf-8'))
    return h.hexdigest()


def tokenize_to_shards(pieces, total_chars, tok, data_dir, name, num_workers, quiet):
    """Tokenize the (text, split, ends) pieces in order into data_dir's train and val shards, ending each
    document with end-of-text; in worker processes when the text is large. Returns the flushed writers."""
    dtype = token_dtype(tok.vocab_size)
    writers = {split: ShardWriter(data_dir, name, split, dtype) for split in ('train', 'val')}
    workers = num_workers or os.cpu_count() or 1
    pool = None
    if total_chars > 4 * PIECE_CHARS and workers > 1:
        import multiprocessing as mp
        pool = mp.get_context('spawn').Pool(workers, initializer=_start_worker, initargs=(tok.spec,))
    results = pool.imap(encode_piece, pieces, chunksize=1) if pool else (encode_piece(p, tok) for p in pieces)
    done_chars, t0 = 0, time.time()
    shown = t0
    try:
        for ids, split, ends, n_chars in results:
            writers[split].add(ids)
            if ends:
                writers[split].add(np.array([tok.eot_id], dtype))
            done_chars += n_chars
            if not quiet and time.time() - shown > 1:
                shown = time.time()
                print(f"\rtokenizing {name}: {done_chars / 1e6:.1f} of ~{total_chars / 1e6:.1f} M characters "
                      f"({done_chars / max(shown - t0, 1e-9) / 1e6:.1f} M/s)", end='', file=sys.stderr, flush=True)
    finally:
        if pool:
            pool.close()
            pool.join()
    if not quiet:
        print(f"\rtokenizing {name}: {done_chars / 1e6:.1f} M characters in {time.time() - t0:.1f}s" + ' ' * 20,
              file=sys.stderr)
    for w in writers.values():
        w.flush()
    return writers


def write_meta(data_dir, name, tok, writers, fp, source):
    """meta.json, written last: its presence means the shards beside it are complete. Shards of an
    earlier, larger run are removed first; a tokenizer.json travels with the shards, so they decode anywhere."""
    keep = {p for w in writers.values() for p in w.paths}
    for old in data_dir.glob(f"{name}_*.bin"):
        if old.name not in keep:
            old.unlink()
    info = {'tokenizer': tok.name, 'vocab_size': tok.vocab_size, 'eot_id': tok.eot_id, 'fingerprint': fp,
            'train_tokens': writers['train'].total, 'val_tokens': writers['val'].total,
            'shards': sorted(keep), 'source': source}
    if isinstance(tok.spec, dict):
        save_text(data_dir / 'tokenizer.json', tok.spec['json'])
        info['tokenizer_file'] = 'tokenizer.json'
    save_text(data_dir / 'meta.json', json.dumps(info, indent=2))
    return info


def prepare(dataset='pydoc', input='', tokenizer='bytes', data_dir='', raw_dir='', val_fraction=0.1,
            num_workers=0, quiet=False, vocab_size=4096, tokenizer_max_chars=20_000_000):
    """Tokenize a data set into shards + meta.json in data_dir (skipped when nothing changed); tokenizer
    'bpe' first trains our own BPE of vocab_size tokens on the training split. Returns data_dir."""
    name = Path(input.rstrip('/\\')).stem if input else dataset
    data_dir = Path(data_dir or Path('data') / name)
    docs = list_documents(dataset, input, Path(raw_dir or data_dir))
    # pydoc: the standard library's docstrings are more training text, val stays the topics' last 10% (bits per
    # byte compare with runs on the topics alone); fingerprinted by this Python and the skip list, parsed if needed
    docstrings_stamp = (f"{sys.version}|{sysconfig.get_paths()['stdlib']}|{sorted(STDLIB_SKIP)}"
                        if dataset == 'pydoc' and not input else None)
    tok = None if tokenizer == 'bpe' else get_tokenizer(tokenizer)
    fp = fingerprint(docs, tok.name if tok else ['bpe', vocab_size, tokenizer_max_chars, GPT4_PATTERN], val_fraction,
                     docstrings_stamp)
    meta = data_dir / 'meta.json'
    if meta.is_file() and json.loads(meta.read_text(encoding='utf-8')).get('fingerprint') == fp:
        if not quiet:
            print(f"{data_dir}: already prepared from the same input; nothing to do")
        return data_dir
    train_only = list(stdlib_docstrings()) if docstrings_stamp else []
    docs = train_only + docs
    total_chars = sum(size for _, size, _ in docs)
    if total_chars == 0:
        raise ValueError(f"{input or dataset}: the text is empty; nothing to train on")
    if tok is None:
        tok = train_tokenizer(docs, val_fraction, len(train_only), vocab_size, tokenizer_max_chars, quiet)
    data_dir.mkdir(parents=True, exist_ok=True)
    pieces = iter_pieces(docs, val_fraction, len(train_only))
    writers = tokenize_to_shards(pieces, total_chars, tok, data_dir, name, num_workers, quiet)
    info = write_meta(data_dir, name, tok, writers, fp, input or dataset)
    if not quiet:
        print(f"{data_dir}: {info['train_tokens']:,} train + {info['val_tokens']:,} val tokens ({tok.name})")
    return data_dir


def prepare_fineweb(data_dir, num_shards):
    """llm.c's GPT-2-tokenized FineWeb10B shards, downloaded as they are (100M tokens each)."""
    data_dir = Path(data_dir or 'data/fineweb10B')
    if not 1 <= num_shards <= 103:
        raise ValueError(f"--num_shards={num_shards}: FineWeb10B has 1 to 103 training shards")
    names = ['fineweb_val_000000.bin'] + [f'fineweb_train_{i:06d}.bin' for i in range(1, num_shards + 1)]
    for i, shard in enumerate(names):
        download(FINEWEB_URL + shard, data_dir / shard, desc=f"[{i + 1}/{len(names)}] {shard}")
    save_text(data_dir / 'meta.json', json.dumps({'tokenizer': 'gpt2', 'vocab_size': 50257, 'eot_id': 50256,
                                                   'source': 'kjj0/fineweb10B-gpt2'}, indent=2))
    return data_dir


# -------------------------------------------------------------------- a generated task for GRPO (finetune_grpo.py)

ARITHMETIC = {'worked': 200, 'val': 100, 'answers': 20_000, 'test': 500}  # problems in each part
ARITHMETIC_DIGITS = 3  # operands of this many digits
ARITHMETIC_HELD_OUT = 0.2  # the share of operands that only the test problems use


def worked_addition(a, b):
    """a+b as pretraining text: the problem line, one line per column from the right with its carry, then
    the sum alone on the last line (what the exact verifier reads):  '58+67' '8+7=15' '5+6+1=12' '125'."""
    lines, carry = [f"{a}+{b}"], 0
    xs, ys = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(xs), len(ys))):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        lines.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={x + y + carry}")
        carry = (x + y + carry) // 10
    return '\n'.join(lines + [str(a + b)])


def prepare_arithmetic(data_dir='', seed=1337, quiet=False):
    """The from-scratch GRPO demonstration's data, like the sequel's (few worked solutions, many problems a verifier
    checks), in data_dir: a few worked additions as train/val shards (the only supervised data), answers.json
    (more problems with final answers only: GRPO's prompts) and test.json (held-out operands), [{problem, answer}]."""
    data_dir = Path(data_dir or 'data/arithmetic')
    rng = random.Random(seed)
    operands = list(range(10 ** (ARITHMETIC_DIGITS - 1), 10 ** ARITHMETIC_DIGITS))
    rng.shuffle(operands)
    n_held = int(len(operands) * ARITHMETIC_HELD_OUT)
    held, seen = operands[:n_held], operands[n_held:]

    def problems(pool, n):
        return [(rng.choice(pool), rng.choice(pool)) for _ in range(n)]
    tok = get_tokenizer('bytes')
    data_dir.mkdir(parents=True, exist_ok=True)
    writers = {}
    for split, n in (('train', ARITHMETIC['worked']), ('val', ARITHMETIC['val'])):
        docs = [tok.encode(worked_addition(a, b)) + [tok.eot_id] for a, b in problems(seen, n)]
        writers[split] = ShardWriter(data_dir, 'arithmetic', split)
        writers[split].add(np.array([t for doc in docs for t in doc], dtype=np.uint16))
        writers[split].flush()
    for name, pool, n in (('answers', seen, ARITHMETIC['answers']), ('test', held, ARITHMETIC['test'])):
        rows = [{'problem': f"{a}+{b}", 'answer': str(a + b)} for a, b in problems(pool, n)]
        save_text(data_dir / f"{name}.json", '[\n' + ',\n'.join(json.dumps(row) for row in rows) + '\n]\n')
    info = write_meta(data_dir, 'arithmetic', tok, writers, f"arithmetic|{seed}|{ARITHMETIC}|{ARITHMETIC_DIGITS}",
                      'arithmetic')
    if not quiet:
        print(f"{data_dir}: {ARITHMETIC['worked']} worked additions ({info['train_tokens']:,} tokens) + "
              f"{ARITHMETIC['val']} for val; {ARITHMETIC['answers']:,} answer-only problems in answers.json, "
              f"{ARITHMETIC['test']} held-out in test.json")
    return data_dir


# -------------------------------------------------------------------- instructions and problems (for fine-tuning)

PROBLEM_SETS = {  # {problem, answer} sets by name: (url, file name); no checksums are published for them
    'math500': ('https://raw.githubusercontent.com/rasbt/reasoning-from-scratch/main/ch03/01_main-chapter-code/'
                'math500_test.json', 'math500_test.json'),  # the sequel's JSON list
    'math500_jsonl': ('https://huggingface.co/datasets/HuggingFaceH4/MATH-500/resolve/main/test.jsonl',
                      'math500_test.jsonl'),  # the published JSON-lines test set
    'math_train': ('https://raw.githubusercontent.com/rasbt/math_full_minus_math500/refs/heads/main/'
                   'math_full_minus_math500.json', 'math_full_minus_math500.json'),  # the sequel's 12,000 for training
}


def read_entries(path, required=('instruction', 'input', 'output')):
    """Entries from a JSON list or JSONL file; one missing a field stops with its index."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data={path}: no such file")
    text = read_text(path)
    try:
        entries = (json.loads(text) if text.lstrip().startswith('[')
                   else [json.loads(line) for line in text.splitlines() if line.strip()])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is neither a JSON list nor JSON lines ({e.msg} at line {e.lineno})") from None
    if not entries:
        raise ValueError(f"{path} holds no entries")
    for i, entry in enumerate(entries):
        missing = [k for k in required if not isinstance(entry, dict) or not isinstance(entry.get(k), str)]
        if missing or not entry[required[0]].strip():
            raise ValueError(f"{path} entry {i}: missing or empty {', '.join(missing) or required[0]}")
    return entries


def load_problems(source, folder):
    """[{problem, answer}] from a JSON list or JSON lines file, or one of PROBLEM_SETS by name (downloaded once)."""
    if source in PROBLEM_SETS:
        url, name = PROBLEM_SETS[source]
        source = download(url, Path(folder) / name)
    return read_entries(source, ('problem', 'answer'))


if __name__ == '__main__':
    configure(globals())
    if not 0 <= val_fraction < 1:
        die(f"--val_fraction={val_fraction}: give a fraction in [0, 1)")
    if tokenizer_max_chars < 1:
        die(f"--tokenizer_max_chars={tokenizer_max_chars}: give a number of characters of at least 1")
    try:
        if dataset == 'fineweb10B' and not input:
            prepare_fineweb(data_dir, num_shards)
        elif dataset == 'arithmetic' and not input:
            prepare_arithmetic(data_dir)
        else:
            prepare(dataset, input, tokenizer, data_dir, raw_dir, val_fraction, num_workers, vocab_size=vocab_size,
                    tokenizer_max_chars=tokenizer_max_chars)
    except (OSError, ValueError) as e:
        die(e)
