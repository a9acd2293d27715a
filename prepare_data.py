"""
Text -> tokens -> token shards (book chapter 2), the input of train.py.
    python prepare_data.py                                   # Python's own docs, byte tokens: no download
    python prepare_data.py --dataset=verdict --tokenizer=gpt2
    python prepare_data.py --tokenizer=bpe --vocab_size=4096   # train our own BPE on the training split first
    python prepare_data.py --input=my_texts/ --tokenizer=path/to/Llama-3.2-1B --data_dir=data/mine
    python prepare_data.py --dataset=fineweb10B --num_shards=10   # llm.c's GPT-2 tokens, 100M per shard
Shards use the llm.c / modded-nanogpt format (a 256 x int32 header: magic 20240520, version 1,
token count; then uint16 tokens), so shards made here train there and theirs train here; a
vocabulary above 65,536 ids (Llama 3, Qwen) writes version 2, the same with uint32 tokens.
meta.json beside them names the tokenizer (and a tokenizer.json copy, when it has one).
Also the home of the tokenizers every script uses: bytes, GPT-2, any byte-level BPE tokenizer.json
(Llama 3, Qwen, SmolLM2, our own) run by tiktoken, and the chat templates.
"""
import base64
import functools
import hashlib
import heapq
import json
import os
import re
import sys
import sysconfig
import time
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from weights import download, is_hub_name, pretrained_path

dataset = 'pydoc'  # pydoc | verdict | shakespeare | fineweb10B (ignored when --input is given)
input = ''  # a UTF-8 text file, or a folder of .txt files (one document each)
tokenizer = 'bytes'  # bytes (256 byte values + end-of-text) | gpt2 | bpe (trained here) | qwen3-0.6b, a hub id, a folder or tokenizer.json
vocab_size = 4096  # --tokenizer=bpe: 256 bytes + merges + end-of-text
tokenizer_max_chars = 20_000_000  # --tokenizer=bpe: learn from at most this many characters of the training split
data_dir = ''  # where the shards go; default data/<dataset> (or data/<input name>)
raw_dir = ''  # where downloaded raw files are kept (and first looked for); default: data_dir
val_fraction = 0.1  # the last 10% of the text is the validation split, as in the book
num_shards = 1  # fineweb10B: how many 100M-token training shards to fetch (up to 103)
num_workers = 0  # tokenizer processes for large inputs; 0 = one per CPU core

EOT = '<|endoftext|>'
MAGIC, HEADER_INTS = 20240520, 256
SHARD_DTYPES = {1: np.uint16, 2: np.uint32}  # header version: token type (2 is ours, for vocabularies above 65,536)
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
    name = spec = 'bytes'
    vocab_size, eot_id, special_ids = 257, 256, {256}

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
    name = spec = 'gpt2'
    vocab_size, eot_id, special_ids = 50257, 50256, {50256}

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


# GPT-2's split of text into pieces that BPE works on one by one (the ByteLevel pre-tokenizer's use_regex);
# GPT-4's (tiktoken's cl100k_base), which Llama 3 uses too and our own BPE trains with
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# GPT-2's split run on the text between digits (SmolLM2's Digits + ByteLevel): ' ?\p{N}+' can no longer match,
# and a digit ends a run of spaces as the end of the text would
GPT2_BETWEEN_DIGITS = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
END_OF_TEXT_TOKENS = (EOT, '<|end_of_text|>')  # GPT-2, Qwen, SmolLM2 and ours; Llama 3
LLAMA3_SPECIAL_TOKENS = (['<|begin_of_text|>', '<|end_of_text|>', '<|reserved_special_token_0|>',
                          '<|reserved_special_token_1|>', '<|finetune_right_pad_id|>', '<|reserved_special_token_2|>',
                          '<|start_header_id|>', '<|end_header_id|>', '<|eom_id|>', '<|eot_id|>', '<|python_tag|>']
                         + [f'<|reserved_special_token_{i}|>' for i in range(3, 248)])  # 128000 ... 128255


def byte_to_unicode():
    """GPT-2's table giving each byte a printable character (a space is 'Ġ'): tokenizer.json spells tokens so."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    unprintable = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(unprintable)}}


def vocab_ranks(model, special_ids, label):
    """tiktoken's ranks {token bytes: id} from a tokenizer.json's BPE model. tiktoken merges the adjacent pair
    whose joined bytes have the lowest id, the model the pair listed first in its merges: that is one rule when
    the merges make tokens in id order and every token of two or more bytes is made by one; checked here."""
    if model.get('type') != 'BPE' or model.get('byte_fallback') or model.get('continuing_subword_prefix') \
            or model.get('end_of_word_suffix'):
        raise ValueError(f"tokenizer {label}: not a byte-level BPE (model {model.get('type')}); only those "
                         "(GPT-2, Llama 3, Qwen, SmolLM2 style) can be read")
    to_byte = {char: b for b, char in byte_to_unicode().items()}
    vocab, ranks = model.get('vocab') or {}, {}
    for token, id in vocab.items():
        if id not in special_ids:
            try:
                ranks[bytes(to_byte[char] for char in token)] = id
            except KeyError:
                raise ValueError(f"tokenizer {label}: token {token!r} is not spelled in GPT-2's byte alphabet; "
                                 "only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM2 style) can be read") \
                    from None
    if sum(len(token) == 1 for token in ranks) != 256:
        raise ValueError(f"tokenizer {label}: its vocabulary lacks some of the 256 byte tokens a byte-level BPE needs")
    made, last = set(), -1
    for i, merge in enumerate(model.get('merges') or []):
        first, second = merge.split(' ') if isinstance(merge, str) else merge
        id = vocab.get(first + second, -1)
        if id < last or first not in vocab or second not in vocab:
            raise ValueError(f"tokenizer {label}: merge {i} ({first} {second}) does not make a token in id order, "
                             "so tiktoken cannot run it the same way")
        made.add(id)
        last = id
    unmade = [token for token, id in ranks.items() if len(token) > 1 and id not in made]
    if unmade:
        raise ValueError(f"tokenizer {label}: {len(unmade)} tokens (e.g. {unmade[0]!r}) are made by no merge, "
                         "so tiktoken would make them where Hugging Face does not")
    return ranks


def steps_of(component, key):
    """The steps of a tokenizer.json component: those of a Sequence (listed under key), itself, or none."""
    if not component:
        return []
    return component.get(key) or [] if component.get('type') == 'Sequence' else [component]


def split_pattern(pre_tokenizer, label):
    """A tokenizer.json's pre-tokenizer as one regex that cuts the text into the same pieces for tiktoken:
    ByteLevel's use_regex is GPT-2's pattern; Split(Regex, Isolated) its regex, plus a last branch for the text
    between matches (Isolated keeps it as pieces; tiktoken would drop it); Digits then ByteLevel (SmolLM2) a digit
    or GPT-2's pattern on the text between digits. ByteLevel(use_regex=false) only spells bytes: no split."""
    steps = steps_of(pre_tokenizer, 'pretokenizers')
    if not any(step.get('type') == 'ByteLevel' and not step.get('add_prefix_space') for step in steps):
        raise ValueError(f"tokenizer {label}: its pre-tokenizer has no ByteLevel step (or adds a prefix space); "
                         "only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM2 style) can be read")
    splits = []
    for step in steps:
        kind, pattern = step.get('type'), step.get('pattern') or {}
        if kind == 'ByteLevel' and step.get('use_regex', True):
            splits.append(('ByteLevel', GPT2_PATTERN))
        elif kind == 'Split' and 'Regex' in pattern and step.get('behavior') == 'Isolated' and not step.get('invert'):
            splits.append(('Split', pattern['Regex']))
        elif kind == 'Digits':
            splits.append(('Digits', r'\p{N}' if step.get('individual_digits') else r'\p{N}+'))
        elif kind != 'ByteLevel':
            splits.append((kind, None))
    kinds = [kind for kind, _ in splits]
    if kinds == ['ByteLevel']:
        return GPT2_PATTERN
    if kinds == ['Split']:
        return f"{splits[0][1]}|(?:(?!{splits[0][1]})[\\s\\S])+"
    if kinds == ['Digits', 'ByteLevel']:
        return f"{splits[0][1]}|{GPT2_BETWEEN_DIGITS}"
    raise ValueError(f"tokenizer {label}: pre-tokenizer {' + '.join(map(str, kinds)) or 'ByteLevel without a split'} "
                     "is not supported; supported: ByteLevel, Split(Regex, Isolated) + ByteLevel, Digits + ByteLevel")


def normal_forms(normalizer, label):
    """The Unicode normal forms a tokenizer.json's normalizer applies (Qwen's NFC); others are refused."""
    forms = [step.get('type') for step in steps_of(normalizer, 'normalizers')]
    if any(form not in ('NFC', 'NFD', 'NFKC', 'NFKD') for form in forms):
        raise ValueError(f"tokenizer {label}: normalizer {'+'.join(map(str, forms))} is not supported (only NFC, NFD, "
                         "NFKC, NFKD)")
    return forms


class JsonTokenizer:
    """A byte-level BPE in Hugging Face's tokenizer.json format (GPT-2, Llama 3, Qwen2/2.5/3, SmolLM2, ours) run by
    tiktoken: the vocabulary becomes tiktoken's ranks, the pre-tokenizer one split regex, the added tokens its
    special tokens, encoded wherever their text appears (chat templates need that). Like the tokenizers library
    with add_special_tokens=False, encode adds no <|begin_of_text|>: templates write it."""

    def __init__(self, label, text):
        import tiktoken
        digest = hashlib.sha256(text.encode('utf-8')).hexdigest()[:12]
        self.name = f"{label.removesuffix('-' + digest)}-{digest}"  # unique per content, and stable when reloaded
        self.spec = {'name': self.name, 'json': text}  # what checkpoints and meta.json carry
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"tokenizer {label}: not valid JSON ({e}); give a Hugging Face tokenizer.json") from None
        if not isinstance(config, dict) or not isinstance(config.get('model'), dict):
            raise ValueError(f"tokenizer {label}: no 'model' in it; give a Hugging Face tokenizer.json")
        specials = {token['content']: token['id'] for token in config.get('added_tokens') or []}
        ranks = vocab_ranks(config['model'], set(specials.values()), label)
        self.forms = normal_forms(config.get('normalizer'), label)
        self.enc = tiktoken.Encoding(self.name, pat_str=split_pattern(config.get('pre_tokenizer'), label),
                                     mergeable_ranks=ranks, special_tokens=specials)
        self.special_ids = set(specials.values())
        self.vocab_size = max([*ranks.values(), *self.special_ids]) + 1
        self.eot_id = next((specials[token] for token in END_OF_TEXT_TOKENS if token in specials), None)
        if self.eot_id is None:
            raise ValueError(f"tokenizer {label}: it has no end-of-text token ({' or '.join(END_OF_TEXT_TOKENS)})")
        # normalizing leaves special tokens alone, as in the tokenizers library: cut them out first
        self.specials_split = re.compile('(' + '|'.join(map(re.escape, sorted(specials, key=len, reverse=True))) + ')')

    def encode(self, text):
        if self.forms:
            parts = self.specials_split.split(text)  # odd parts are the special tokens
            for i in range(0, len(parts), 2):
                for form in self.forms:
                    parts[i] = unicodedata.normalize(form, parts[i])
            text = ''.join(parts)
        return self.enc.encode(text, allowed_special='all')

    def decode_bytes(self, ids):
        return self.enc.decode_bytes(ids)

    def decode(self, ids):
        return self.enc.decode(ids, errors='replace')


def bpe_json(ranks, merges, pattern, special_tokens, ignore_merges=False):
    """Hugging Face's tokenizer.json text for a byte-level BPE, laid out as Llama 3's: ranks {token bytes: id} and
    merges [(bytes, bytes)] spelled in GPT-2's byte alphabet, `pattern` as the pre-tokenizer's Split,
    special_tokens {text: id} as added tokens."""
    alphabet = byte_to_unicode()

    def spell(token):
        return ''.join(alphabet[b] for b in token)
    config = {
        'version': '1.0', 'truncation': None, 'padding': None,
        'added_tokens': [{'id': id, 'content': text, 'single_word': False, 'lstrip': False, 'rstrip': False,
                          'normalized': False, 'special': True} for text, id in special_tokens.items()],
        'normalizer': None,
        'pre_tokenizer': {'type': 'Sequence', 'pretokenizers': [
            {'type': 'Split', 'pattern': {'Regex': pattern}, 'behavior': 'Isolated', 'invert': False},
            {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True, 'use_regex': False}]},
        'post_processor': None,
        'decoder': {'type': 'ByteLevel', 'add_prefix_space': True, 'trim_offsets': True, 'use_regex': True},
        'model': {'type': 'BPE', 'dropout': None, 'unk_token': None, 'continuing_subword_prefix': None,
                  'end_of_word_suffix': None, 'fuse_unk': False, 'byte_fallback': False, 'ignore_merges': ignore_merges,
                  'vocab': {spell(token): id for token, id in sorted(ranks.items(), key=lambda item: item[1])},
                  'merges': [f"{spell(first)} {spell(second)}" for first, second in merges]}}
    return json.dumps(config, ensure_ascii=False, indent=1)


def llama3_tokenizer_json(path):
    """Llama 3's original/tokenizer.model (tiktoken's own format: a base64 token and its rank per line) as
    tokenizer.json text, converted as Hugging Face does: Llama 3's split (GPT-4's pattern), its 256 special tokens
    after the ranks (<|begin_of_text|> = 128000, <|end_of_text|>, ... <|eot_id|> = 128009, ...), and every split
    of a token into two tokens as a merge, since tiktoken merges any pair whose bytes join into a token."""
    ranks = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        try:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}, line {number}: not tiktoken's 'base64-token rank' format; a SentencePiece "
                             "tokenizer.model (as Llama 2's) is not supported") from None
    if not ranks:
        raise ValueError(f"{path} is empty; give Llama 3's original/tokenizer.model or a tokenizer.json")
    merges = sorted((ranks[token], ranks[token[:k]], ranks[token[k:]], token[:k], token[k:])
                    for token in ranks for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks)
    specials = {text: max(ranks.values()) + 1 + i for i, text in enumerate(LLAMA3_SPECIAL_TOKENS)}
    return bpe_json(ranks, [(first, second) for *_, first, second in merges], GPT4_PATTERN, specials,
                    ignore_merges=True)


def get_tokenizer(spec):
    """bytes | gpt2 | a published model's name or hub id (qwen3-0.6b, Qwen/Qwen3-0.6B: its tokenizer.json is
    downloaded once, without the weights) | a folder holding tokenizer.json (or Llama 3's original/tokenizer.model), or such a file |
    {'name', 'json': tokenizer.json text}, what a tokenizer's .spec gives (so checkpoints and meta.json carry it)."""
    if isinstance(spec, dict):
        if not isinstance(spec.get('name'), str) or not isinstance(spec.get('json'), str):
            raise ValueError("a tokenizer given as a dict needs {'name': str, 'json': tokenizer.json text}")
        return JsonTokenizer(spec['name'], spec['json'])
    if spec == 'bytes':
        return ByteTokenizer()
    if spec == 'gpt2':
        return GPT2Tokenizer()
    if spec == 'bpe':
        raise ValueError("the bpe tokenizer is trained per data set: prepare_data.py --tokenizer=bpe makes it, and "
                         "data_tokenizer(data_dir) or its data_dir/tokenizer.json loads it")
    path = pretrained_path(spec, weights=False) if is_hub_name(spec) else Path(spec)  # qwen3-0.6b: its tokenizer.json
    if path.is_dir():
        found = [p for p in (path / 'tokenizer.json', path / 'original' / 'tokenizer.model') if p.is_file()]
        if not found:
            raise ValueError(f"{path} holds no tokenizer.json (nor original/tokenizer.model); give a model folder "
                             "in the Hugging Face layout or the file itself")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"unknown tokenizer {spec!r}: not bytes, gpt2, bpe, or an existing folder or tokenizer.json")
    folder = path.parent.parent if path.parent.name == 'original' else path.parent
    label = folder.resolve().name or 'tokenizer'
    if path.suffix == '.json':
        return JsonTokenizer(label, path.read_text(encoding='utf-8'))
    return JsonTokenizer(label, llama3_tokenizer_json(path))


def token_bytes(tokenizer):
    """The number of UTF-8 bytes each token id stands for (0 for special tokens and unused ids): a loss per
    token summed over these gives bits per byte, which compares across tokenizers."""
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for id in range(tokenizer.vocab_size):
        if id not in tokenizer.special_ids:
            try:
                lengths[id] = len(tokenizer.decode_bytes([id]))
            except KeyError:  # an id no token has
                pass
    return lengths


# -------------------------------------------------------------------- our own BPE (ch02 bonus: BPETokenizerSimple)

def merge_pair(ids, pair, new_id):
    """ids with each occurrence of pair, left to right, replaced by new_id (the book's replace_pair)."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe(texts, vocab_size, pattern=GPT4_PATTERN, quiet=False):
    """Learn a byte-level BPE from the strings in `texts` and return it as tokenizer.json text: ids 0-255 the
    bytes, then vocab_size - 257 merges, then end-of-text. The book's BPETokenizerSimple.train, with these
    departures: it merges bytes, not characters, so any text encodes; the text is first cut with `pattern` into
    chunks (words with their leading space, numbers, punctuation, as tiktoken does), and each distinct chunk is
    kept once with its count, so memory grows with the distinct chunks, not the text; after a merge the pair
    counts are updated only in the chunks that held the pair, instead of recounting everything; the most frequent
    pair comes off a heap (ties: the smallest pair of ids, so the result does not depend on dict order)."""
    import regex  # installed with tiktoken; unlike re, it knows \p{L}
    if vocab_size < 257:
        raise ValueError(f"--vocab_size={vocab_size}: a byte-level BPE needs at least 257 tokens "
                         "(256 bytes + end-of-text)")
    split, counts = regex.compile(pattern), Counter()
    for text in texts:
        counts.update(split.findall(text))
    words, freqs = [list(chunk.encode('utf-8')) for chunk in counts], list(counts.values())
    pair_counts, where = defaultdict(int), defaultdict(set)  # pair: occurrences in the text; pair: chunks holding it
    for w, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[w]
            where[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    tokens, merges = [bytes([b]) for b in range(256)], []
    t0 = shown = time.time()
    for new_id in range(256, vocab_size - 1):
        while heap and -heap[0][0] != pair_counts.get(heap[0][1]):  # pushed before the pair's count changed
            heapq.heappop(heap)
        if not heap:
            if shown > t0:  # end the progress line first
                print(file=sys.stderr)
            raise ValueError(f"--vocab_size={vocab_size} is more than the text can fill: no pair is left to merge "
                             f"after {len(merges)} merges; use a smaller vocab_size or more text")
        pair = heapq.heappop(heap)[1]
        changed = set()
        for w in where.pop(pair):
            word, freq = words[w], freqs[w]
            merged = merge_pair(word, pair, new_id)
            if len(merged) == len(word):  # an earlier merge already took the pair out of this chunk
                continue
            for old in zip(word, word[1:]):
                pair_counts[old] -= freq
            for new in zip(merged, merged[1:]):
                pair_counts[new] += freq
                where[new].add(w)
            changed.update(zip(word, word[1:]), zip(merged, merged[1:]))
            words[w] = merged
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                del pair_counts[p]
        merges.append((tokens[pair[0]], tokens[pair[1]]))
        tokens.append(tokens[pair[0]] + tokens[pair[1]])
        if not quiet and (time.time() - shown > 0.5 or new_id == vocab_size - 2):
            shown = time.time()
            print(f"\rtraining BPE: {len(merges):,} of {vocab_size - 257:,} merges ({shown - t0:.1f}s)", end='',
                  file=sys.stderr, flush=True)
    if not quiet:
        print(file=sys.stderr)
    return bpe_json({token: id for id, token in enumerate(tokens)}, merges, pattern, {EOT: vocab_size - 1})


# -------------------------------------------------------------------- instruction prompts and chat formats (ch07)

PROMPT_STYLES = ('alpaca', 'phi3', 'llama3', 'chatml')
ALPACA_OPENING = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                  "the request.")
ROLES = ('system', 'user', 'assistant')
CHAT_FORMATS = {  # style: (start of a conversation, each role's turn, the header that asks for the assistant's turn)
    'alpaca': ('', {'system': '{}', 'user': '\n\n### Instruction:\n{}', 'assistant': '\n\n### Response:\n{}'},
               '\n\n### Response:\n'),
    'phi3': ('', {'system': '<|system|>\n{}\n', 'user': '<|user|>\n{}\n', 'assistant': '<|assistant|>:\n{}\n'},
             '<|assistant|>:\n'),
    'llama3': ('<|begin_of_text|>',
               {role: f'<|start_header_id|>{role}<|end_header_id|>\n\n{{}}<|eot_id|>' for role in ROLES},
               '<|start_header_id|>assistant<|end_header_id|>\n\n'),
    'chatml': ('', {role: f'<|im_start|>{role}\n{{}}<|im_end|>\n' for role in ROLES}, '<|im_start|>assistant\n'),
}
# what follows a response in training text (and stops generation): the book's templates end with the tokenizer's
# end-of-text (this is its GPT-2 spelling; response_end_id gives any tokenizer's), the chat formats end the turn
RESPONSE_END = {'alpaca': EOT, 'phi3': EOT, 'llama3': '<|eot_id|>', 'chatml': '<|im_end|>'}


def check_style(style):
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; use {', '.join(PROMPT_STYLES)}")


def format_input(entry, style='alpaca'):
    """An {instruction, input} entry as text (the book's format_input, 7.2). alpaca is the
    book's template; phi3 its exercise 7.1; llama3 and chatml (Qwen, SmolLM2) a user turn."""
    check_style(style)
    if style == 'alpaca':
        text = ALPACA_OPENING + f"\n\n### Instruction:\n{entry['instruction']}"
        return text + (f"\n\n### Input:\n{entry['input']}" if entry.get('input') else "")
    if style == 'phi3':
        return f"<|user|>\n{entry['instruction']}" + (f"\n{entry['input']}" if entry.get('input') else "")
    start, turns, _ = CHAT_FORMATS[style]
    text = entry['instruction'] + (f"\n\n{entry['input']}" if entry.get('input') else "")
    return start + turns['user'].format(text)


def format_prompt(entry, style='alpaca'):
    """The prompt a model continues with its response: the one template that training, generation and
    sample.py share. Training text = format_prompt(entry) + entry['output'] + RESPONSE_END[style]."""
    return format_input(entry, style) + ("\n<|assistant|>:\n" if style == 'phi3' else CHAT_FORMATS[style][2])


def format_chat(messages, style='alpaca'):
    """A conversation [{'role': 'system' | 'user' | 'assistant', 'content': text}, ...] as one prompt that ends
    with the assistant's header, ready for generation; for one user message the same as format_prompt. alpaca
    opens with the book's sentence unless a system message takes its place; no other style adds a default system
    message (Qwen's and SmolLM2's own templates do)."""
    check_style(style)
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get('role') in ROLES and isinstance(message.get('content'), str)):
            raise ValueError(f"chat message {i} is not {{'role': 'system' | 'user' | 'assistant', 'content': text}}")
    start, turns, header = CHAT_FORMATS[style]
    if style == 'alpaca' and (not messages or messages[0]['role'] != 'system'):
        start = ALPACA_OPENING
    return start + ''.join(turns[message['role']].format(message['content']) for message in messages) + header


def response_end_id(tokenizer, style):
    """The token id that ends a response in `style`: the tokenizer's end-of-text for alpaca and phi3, the
    end-of-turn token for llama3 and chatml, which only a tokenizer that has it (Llama 3; Qwen, SmolLM2) knows."""
    check_style(style)
    if RESPONSE_END[style] == EOT:
        return tokenizer.eot_id
    ids = tokenizer.encode(RESPONSE_END[style])
    if len(ids) != 1 or ids[0] not in tokenizer.special_ids:
        family = 'Llama 3' if style == 'llama3' else 'Qwen or SmolLM2'
        raise ValueError(f"the {style} prompt style ends responses with {RESPONSE_END[style]}, which the "
                         f"{tokenizer.name} tokenizer has no token for; use {family}'s tokenizer, or alpaca or phi3")
    return ids[0]


# -------------------------------------------------------------------- HellaSwag (the benchmark GPT-2 runs are compared on)

HELLASWAG_URL = 'https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl'


def hellaswag_examples(folder):
    """HellaSwag's 10,042 validation examples [{ctx, endings (4), label}], downloaded once into
    folder (or read from it when hellaswag_val.jsonl is already there)."""
    path = download(HELLASWAG_URL, Path(folder) / 'hellaswag_val.jsonl')
    try:
        with open(path, encoding='utf-8') as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [{'ctx': r['ctx'], 'endings': r['endings'], 'label': int(r['label'])} for r in rows]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not HellaSwag's validation set ({type(e).__name__}: {e}); "
                         "delete it to download it again") from None


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
    tmp = Path(str(path) + '.tmp')
    with open(tmp, 'wb') as f:
        f.write(header.tobytes())
        f.write(tokens.astype(SHARD_DTYPES[version], copy=False).tobytes())
    os.replace(tmp, path)


def read_shard(path):
    """The tokens of an llm.c shard as a read-only memory map (uint16, or uint32 for version 2);
    ValueError if corrupt."""
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
    """The tokenizer of a prepared data folder: bytes or gpt2 by name, else the tokenizer.json copied beside
    the shards (checked to be the one they were made with)."""
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


def write_text(path, text):
    """A text file written atomically (temp file + rename): a crash never leaves half of one."""
    tmp = Path(str(path) + '.tmp')
    tmp.write_text(text, encoding='utf-8')
    os.replace(tmp, path)


class ShardWriter:
    """Collects tokens of one split and writes <prefix>_<split>_<index>.bin shards of at most
    SHARD_TOKENS tokens; memory stays bounded by one shard."""

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


@functools.cache  # the same on every call in a process (about 4 s to parse the library)
def stdlib_docstrings():
    """[(name, size, text)] of the docstrings (module, class, function) of every module of this
    Python's standard library, one document a file, tests left out: 1.6 MB of English about
    Python, on every machine that has Python's sources (some trimmed installs do not: then none)."""
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


def _encode(text):  # runs in worker processes
    return np.array(_worker_tokenizer.encode(text), dtype=token_dtype(_worker_tokenizer.vocab_size))


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


def fingerprint(docs, tokenizer, val_fraction):
    h = hashlib.sha256(json.dumps([tokenizer, val_fraction, SHARD_TOKENS, MAGIC]).encode())
    for name, size, source in docs:
        mtime = source.stat().st_mtime_ns if isinstance(source, Path) else 0
        h.update(f"{name}|{size}|{mtime}".encode())
        if isinstance(source, str):
            h.update(source.encode('utf-8'))
    return h.hexdigest()


def prepare(dataset='pydoc', input='', tokenizer='bytes', data_dir='', raw_dir='', val_fraction=0.1,
            num_workers=0, quiet=False, vocab_size=4096, tokenizer_max_chars=20_000_000):
    """Tokenize a data set into shards + meta.json in data_dir (skipped when nothing changed); tokenizer
    'bpe' first trains our own BPE of vocab_size tokens on the training split. Returns data_dir."""
    name = Path(input.rstrip('/\\')).stem if input else dataset
    data_dir = Path(data_dir or Path('data') / name)
    raw_dir = Path(raw_dir or data_dir)
    docs = list_documents(dataset, input, raw_dir)
    # pydoc: the standard library's docstrings are more training text; the validation split stays the
    # topics' last 10%, so that bits per byte compare with runs on the topics alone. They are a function
    # of this Python and the skip list, fingerprinted so: parsed (4 s) only when there is work to do
    with_docstrings = dataset == 'pydoc' and not input
    stamp = f"{sys.version}|{sysconfig.get_paths()['stdlib']}|{sorted(STDLIB_SKIP)}"
    tok = None if tokenizer == 'bpe' else get_tokenizer(tokenizer)
    fp = fingerprint(([('stdlib docstrings', 0, stamp)] if with_docstrings else []) + docs,
                     tok.name if tok else ['bpe', vocab_size, tokenizer_max_chars, GPT4_PATTERN], val_fraction)
    meta = data_dir / 'meta.json'
    if meta.is_file() and json.loads(meta.read_text(encoding='utf-8')).get('fingerprint') == fp:
        if not quiet:
            print(f"{data_dir}: already prepared from the same input; nothing to do")
        return data_dir
    train_only = list(stdlib_docstrings()) if with_docstrings else []
    docs = train_only + docs
    total = sum(size for _, size, _ in docs)
    if total == 0:
        raise ValueError(f"{input or dataset}: the text is empty; nothing to train on")
    if tok is None:
        tok = train_tokenizer(docs, val_fraction, len(train_only), vocab_size, tokenizer_max_chars, quiet)
    data_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    writers = {s: ShardWriter(data_dir, name, s, dtype) for s in ('train', 'val')}
    pieces = iter_pieces(docs, val_fraction, len(train_only))
    workers = num_workers or os.cpu_count() or 1
    pool = None
    if total > 4 * PIECE_CHARS and workers > 1:  # large: tokenize pieces in parallel, in order
        import multiprocessing as mp
        pool = mp.get_context('spawn').Pool(workers, initializer=_start_worker, initargs=(tok.spec,))
    order = []  # (split, ends a document, characters) of each piece, in the order the tokenizer gets them

    def jobs():
        for text, split, ends in pieces:
            order.append((split, ends, len(text)))
            yield text
    results = pool.imap(_encode, jobs(), chunksize=1) if pool else (np.array(tok.encode(t), dtype) for t in jobs())
    done_chars, t0 = 0, time.time()
    shown = t0
    try:
        for i, ids in enumerate(results):
            split, ends, n_chars = order[i]
            writers[split].add(ids)
            if ends:
                writers[split].add(np.array([tok.eot_id], dtype))  # documents end with end-of-text
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
    if isinstance(tok.spec, dict):  # a tokenizer.json travels with its shards, so that they decode anywhere
        write_text(data_dir / 'tokenizer.json', tok.spec['json'])
        info['tokenizer_file'] = 'tokenizer.json'
    write_text(meta, json.dumps(info, indent=2))  # written last: a meta.json means the shards beside it are complete
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
    if tokenizer_max_chars < 1:
        die(f"--tokenizer_max_chars={tokenizer_max_chars}: give a number of characters of at least 1")
    try:
        if dataset == 'fineweb10B' and not input:
            prepare_fineweb(data_dir, num_shards)
        else:
            prepare(dataset, input, tokenizer, data_dir, raw_dir, val_fraction, num_workers, vocab_size=vocab_size,
                    tokenizer_max_chars=tokenizer_max_chars)
    except (OSError, ValueError) as e:
        die(e)
