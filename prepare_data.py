"""
Text -> tokens -> token shards (book chapter 2), the input of train.py.
    python prepare_data.py                                   # Python's own docs, byte tokens: no download
    python prepare_data.py --dataset=verdict --tokenizer=gpt2
    python prepare_data.py --input=my_texts/ --tokenizer=gpt2 --data_dir=data/mine
    python prepare_data.py --dataset=fineweb10B --num_shards=10   # llm.c's GPT-2 tokens, 100M per shard
Shards use the llm.c / modded-nanogpt format (a 256 x int32 header: magic 20240520, version 1,
token count; then uint16 tokens), so shards made here train there and theirs train here.
meta.json beside them names the tokenizer. Also the home of the tokenizers every script uses.
"""
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from model import download

dataset = 'pydoc'  # pydoc | verdict | shakespeare | fineweb10B (ignored when --input is given)
input = ''  # a UTF-8 text file, or a folder of .txt files (one document each)
tokenizer = 'bytes'  # bytes (256 byte values + end-of-text, no files needed) | gpt2 (tiktoken BPE)
data_dir = ''  # where the shards go; default data/<dataset> (or data/<input name>)
raw_dir = ''  # where downloaded raw files are kept (and first looked for); default: data_dir
val_fraction = 0.1  # the last 10% of the text is the validation split, as in the book
num_shards = 1  # fineweb10B: how many 100M-token training shards to fetch (up to 103)
num_workers = 0  # tokenizer processes for large inputs; 0 = one per CPU core

EOT = '<|endoftext|>'
MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
SHARD_TOKENS = 100_000_000  # at most this many tokens per shard (llm.c's size)
PIECE_CHARS = 1 << 20  # large texts are tokenized in pieces of about this many characters

DATASETS = {  # name: (url, file name, sha256)
    'verdict': ('https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt',
                'the-verdict.txt', 'b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f'),
    'shakespeare': ('https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt',
                    'tinyshakespeare.txt', '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'),
}
FINEWEB_URL = 'https://huggingface.co/datasets/kjj0/fineweb10B-gpt2/resolve/main/'


# -------------------------------------------------------------------- tokenizers (ch02)

class ByteTokenizer:
    """The 256 byte values plus end-of-text (id 256): any UTF-8 text, no files needed."""
    name, vocab_size, eot_id = 'bytes', 257, 256

    def encode(self, text):
        ids = []
        for i, part in enumerate(text.split(EOT)):
            if i:
                ids.append(self.eot_id)
            ids.extend(part.encode('utf-8'))
        return ids

    def decode_bytes(self, ids):
        return b''.join(EOT.encode() if i == self.eot_id else bytes((i,)) for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode('utf-8', errors='replace')


class GPT2Tokenizer:
    """GPT-2's byte-pair encoding (book ch. 2.5) through tiktoken: 50,257 tokens."""
    name, vocab_size, eot_id = 'gpt2', 50257, 50256

    def __init__(self):
        import tiktoken
        try:
            self.enc = tiktoken.get_encoding('gpt2')
        except Exception as e:
            raise OSError(f"GPT-2's BPE files could not be loaded ({type(e).__name__}); go online once, "
                          "or set TIKTOKEN_CACHE_DIR to a folder holding them, or use --tokenizer=bytes") from None

    def encode(self, text):
        return self.enc.encode(text, allowed_special={EOT})

    def decode_bytes(self, ids):
        return self.enc.decode_bytes(ids)

    def decode(self, ids):
        return self.enc.decode(ids, errors='replace')


def get_tokenizer(name):
    if name == 'bytes':
        return ByteTokenizer()
    if name == 'gpt2':
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; use gpt2 or bytes")


# -------------------------------------------------------------------- instruction prompts (ch07)

PROMPT_STYLES = ('alpaca', 'phi3')


def format_input(entry, style='alpaca'):
    """An {instruction, input} entry as text (the book's format_input, 7.2). alpaca is the
    book's template; phi3 its exercise 7.1."""
    if style == 'alpaca':
        text = ("Below is an instruction that describes a task. Write a response that appropriately "
                f"completes the request.\n\n### Instruction:\n{entry['instruction']}")
        return text + (f"\n\n### Input:\n{entry['input']}" if entry.get('input') else "")
    if style == 'phi3':
        return f"<|user|>\n{entry['instruction']}" + (f"\n{entry['input']}" if entry.get('input') else "")
    raise ValueError(f"unknown prompt style {style!r}; use {' or '.join(PROMPT_STYLES)}")


def format_prompt(entry, style='alpaca'):
    """The prompt a model continues with its response: the one template that training,
    generation and sample.py share. Training text = format_prompt(entry) + entry['output']."""
    return format_input(entry, style) + {'alpaca': "\n\n### Response:\n", 'phi3': "\n<|assistant|>:\n"}[style]


# -------------------------------------------------------------------- HellaSwag (the benchmark GPT-2 runs are compared on)

HELLASWAG_URL = 'https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl'


def hellaswag_examples(folder):
    """HellaSwag's 10,042 validation examples [{ctx, endings (4), label}], downloaded once into
    folder (or read from it when hellaswag_val.jsonl is already there)."""
    path = download(HELLASWAG_URL, Path(folder) / 'hellaswag_val.jsonl')
    with open(path, encoding='utf-8') as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{'ctx': r['ctx'], 'endings': r['endings'], 'label': int(r['label'])} for r in rows]


# -------------------------------------------------------------------- shards

def write_shard(path, tokens):
    """tokens (uint16 array) -> llm.c shard at path, atomically."""
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, VERSION, len(tokens))
    tmp = Path(str(path) + '.tmp')
    with open(tmp, 'wb') as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())
    os.replace(tmp, path)


def read_shard(path):
    """The tokens of an llm.c shard as a read-only memory map (uint16); ValueError if corrupt."""
    path = Path(path)
    size = path.stat().st_size
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS) if size >= 4 * HEADER_INTS else np.zeros(3, np.int32)
    if header[0] != MAGIC or header[1] != VERSION:
        raise ValueError(f"{path} is not a token shard (bad header); re-run prepare_data.py")
    n = int(header[2])
    if size != 4 * HEADER_INTS + 2 * n:
        raise ValueError(f"{path} is corrupt: its header promises {n:,} tokens but the file holds "
                         f"{(size - 4 * HEADER_INTS) // 2:,}; re-run prepare_data.py")
    return np.memmap(path, dtype=np.uint16, mode='r', offset=4 * HEADER_INTS, shape=(n,))


def find_shards(data_dir, split):
    """Sorted shard paths of a split ('train' or 'val') in data_dir."""
    return sorted(p for p in Path(data_dir).glob('*.bin') if split in p.name)


def read_meta(data_dir):
    """meta.json of a data folder; shards without one are GPT-2 tokens (as llm.c's)."""
    path = Path(data_dir) / 'meta.json'
    if not path.is_file():
        return {'tokenizer': 'gpt2', 'vocab_size': 50257, 'eot_id': 50256}
    return json.loads(path.read_text(encoding='utf-8'))


class ShardWriter:
    """Collects tokens of one split and writes <prefix>_<split>_<index>.bin shards of at most
    SHARD_TOKENS tokens; memory stays bounded by one shard."""

    def __init__(self, folder, prefix, split):
        self.folder, self.prefix, self.split = folder, prefix, split
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
            write_shard(path, np.concatenate(self.buf) if self.buf else np.zeros(0, np.uint16))
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


def read_text(source):
    if isinstance(source, str):
        return source
    try:
        text = source.read_text(encoding='utf-8')
    except UnicodeDecodeError as e:
        raise ValueError(f"{source} is not valid UTF-8 (byte {e.start}); convert it to UTF-8 first") from None
    return text.removeprefix('\ufeff')


def split_pieces(text, size=PIECE_CHARS):
    """Cut a long text into pieces of about `size` characters, each ending in a newline that
    precedes a non-space character, where BPE would split anyway: tokenizing the pieces gives
    the same tokens as tokenizing the whole."""
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


def iter_pieces(docs, val_fraction):
    """(text, split, ends_document) in order. The last val_fraction of the bytes of all
    documents together is 'val', cut at a line boundary (the book splits its text so too)."""
    total = sum(size for _, size, _ in docs)
    boundary, seen = total * (1 - val_fraction), 0
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


def _encode(args):  # runs in worker processes: a module-level function, spawn-safe
    global _worker_tokenizer
    text, name = args
    if _worker_tokenizer is None:
        _worker_tokenizer = get_tokenizer(name)
    return np.array(_worker_tokenizer.encode(text), dtype=np.uint16)


def fingerprint(docs, tokenizer, val_fraction):
    h = hashlib.sha256(json.dumps([tokenizer, val_fraction, SHARD_TOKENS, MAGIC]).encode())
    for name, size, source in docs:
        mtime = source.stat().st_mtime_ns if isinstance(source, Path) else 0
        h.update(f"{name}|{size}|{mtime}".encode())
        if isinstance(source, str):
            h.update(source.encode('utf-8'))
    return h.hexdigest()


def prepare(dataset='pydoc', input='', tokenizer='bytes', data_dir='', raw_dir='', val_fraction=0.1,
            num_workers=0, quiet=False):
    """Tokenize a data set into shards + meta.json in data_dir (skipped when nothing changed).
    Returns data_dir."""
    name = Path(input.rstrip('/\\')).stem if input else dataset
    data_dir = Path(data_dir or Path('data') / name)
    raw_dir = Path(raw_dir or data_dir)
    docs = list_documents(dataset, input, raw_dir)
    tok = get_tokenizer(tokenizer)
    fp = fingerprint(docs, tokenizer, val_fraction)
    meta = data_dir / 'meta.json'
    if meta.is_file() and json.loads(meta.read_text(encoding='utf-8')).get('fingerprint') == fp:
        if not quiet:
            print(f"{data_dir}: already prepared from the same input; nothing to do")
        return data_dir
    total = sum(size for _, size, _ in docs)
    if total == 0:
        raise ValueError(f"{input or dataset}: the text is empty; nothing to train on")
    data_dir.mkdir(parents=True, exist_ok=True)
    writers = {s: ShardWriter(data_dir, name, s) for s in ('train', 'val')}
    pieces = iter_pieces(docs, val_fraction)
    workers = num_workers or os.cpu_count() or 1
    pool = None
    if total > 4 * PIECE_CHARS and workers > 1:  # large: tokenize pieces in parallel, in order
        import multiprocessing as mp
        pool = mp.get_context('spawn').Pool(workers)
    order = []  # (split, ends a document, characters) of each piece, in the order the tokenizer gets them

    def jobs():
        for text, split, ends in pieces:
            order.append((split, ends, len(text)))
            yield text, tokenizer
    results = pool.imap(_encode, jobs(), chunksize=1) if pool else map(_encode, jobs())
    done_chars, t0 = 0, time.time()
    shown = t0
    try:
        for i, ids in enumerate(results):
            split, ends, n_chars = order[i]
            writers[split].add(ids)
            if ends:
                writers[split].add(np.array([tok.eot_id], dtype=np.uint16))  # documents end with end-of-text
            done_chars += n_chars
            if not quiet and time.time() - shown > 1:
                shown = time.time()
                print(f"\rtokenizing {name}: {done_chars / 1e6:.1f} of ~{total / 1e6:.1f} M characters "
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
    keep = {p for w in writers.values() for p in w.paths}
    for old in data_dir.glob(f"{name}_*.bin"):  # shards of an earlier, larger run
        if old.name not in keep:
            old.unlink()
    info = {'tokenizer': tok.name, 'vocab_size': tok.vocab_size, 'eot_id': tok.eot_id, 'fingerprint': fp,
            'train_tokens': writers['train'].total, 'val_tokens': writers['val'].total,
            'shards': sorted(keep), 'source': input or dataset}
    tmp = data_dir / 'meta.json.tmp'
    tmp.write_text(json.dumps(info, indent=2), encoding='utf-8')
    os.replace(tmp, meta)  # written last: a meta.json means the shards beside it are complete
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
    (data_dir / 'meta.json').write_text(json.dumps({'tokenizer': 'gpt2', 'vocab_size': 50257, 'eot_id': 50256,
                                                    'source': 'kjj0/fineweb10B-gpt2'}, indent=2), encoding='utf-8')
    return data_dir


if __name__ == '__main__':
    from configurator import configure, die
    configure(globals())
    if not 0 <= val_fraction < 1:
        die(f"--val_fraction={val_fraction}: give a fraction in [0, 1)")
    try:
        if dataset == 'fineweb10B' and not input:
            prepare_fineweb(data_dir, num_shards)
        else:
            prepare(dataset, input, tokenizer, data_dir, raw_dir, val_fraction, num_workers)
    except (OSError, ValueError) as e:
        die(e)
