"""
Tokenizers (book chapter 2) and the chat templates that belong to them (chapter 7): text <-> token ids.
    from tokenizer import get_tokenizer
    tok = get_tokenizer('gpt2')          # bytes | gpt2 | a model name or hub id | a folder or tokenizer.json
    ids = tok.encode("Hello, world")     # and tok.decode(ids)
bytes and gpt2 need no files (gpt2's BPE comes through tiktoken); everything else is one format, Hugging Face's
tokenizer.json (byte-level BPE: Llama 3, Qwen, SmolLM2, and the ones train_bpe makes here), read into tiktoken's
ranks so that one fast encoder runs them all; Llama 3's original tokenizer.model too. The chat templates live
here because a template is part of a tokenizer, as in Hugging Face: its end-of-turn token must be in the vocabulary.
"""
import base64
import hashlib
import heapq
import json
import math
import re
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np


EOT = '<|endoftext|>'


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


# GPT-2's split of text into pieces that BPE works on one by one (the ByteLevel pre-tokenizer's use_regex);
# GPT-4's (tiktoken's cl100k_base), which Llama 3 uses too and our own BPE trains with
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# GPT-2's split run on the text between digits (SmolLM2's Digits + ByteLevel): ' ?\p{N}+' can no longer match,
# and a digit ends a run of spaces as the end of the text would
GPT2_BETWEEN_DIGITS = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
ONLY_BYTE_LEVEL = "only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM2 style) can be read"
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
    if model.get('byte_fallback'):  # unknown text falls back to <0x..> byte tokens: not bytes merged by BPE
        raise ValueError(f"tokenizer {label}: a BPE with byte_fallback (SentencePiece style, as Llama 2's or "
                         f"Mistral's) is not byte-level; {ONLY_BYTE_LEVEL}")
    if model.get('type') != 'BPE' or model.get('continuing_subword_prefix') or model.get('end_of_word_suffix'):
        raise ValueError(f"tokenizer {label}: not a byte-level BPE (model {model.get('type')}); {ONLY_BYTE_LEVEL}")
    to_byte = {char: b for b, char in byte_to_unicode().items()}
    vocab, ranks = model.get('vocab') or {}, {}
    for token, id in vocab.items():
        if id not in special_ids:
            try:
                ranks[bytes(to_byte[char] for char in token)] = id
            except KeyError:
                raise ValueError(f"tokenizer {label}: token {token!r} is not spelled in GPT-2's byte alphabet; "
                                 f"{ONLY_BYTE_LEVEL}") from None
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
                         f"{ONLY_BYTE_LEVEL}")
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
    """A byte-level BPE in Hugging Face's tokenizer.json format (GPT-2, Llama 3, Qwen, SmolLM2, ours) run by tiktoken:
    the vocabulary becomes its ranks, the pre-tokenizer one split regex, the added tokens special tokens, encoded
    wherever their text is (as chat templates need). As the tokenizers library with add_special_tokens=False,
    encode adds no <|begin_of_text|>: templates write it."""

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
        # every added token is cut out whole (Qwen3's <think>, special false, is one id as in the tokenizers
        # library); only those marked special are control tokens: a non-special one is text, its bytes count
        self.special_ids = {token['id'] for token in config.get('added_tokens') or [] if token.get('special', True)}
        self.vocab_size = max([*ranks.values(), *specials.values()]) + 1
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


SPACE = '\u2581'  # "▁": how SentencePiece spells a space inside its tokens
BYTE_TOKEN = re.compile(r'<0x([0-9A-F]{2})>')  # byte fallback's tokens, one per byte value


class SentencePieceBPE:
    """A SentencePiece-style BPE in Hugging Face's tokenizer.json (Gemma, Llama 2, Mistral): spaces spelled "▁", no
    regex split, merges of characters in the order the file lists them, and byte fallback: a character outside the
    vocabulary is spelled by its UTF-8 bytes' <0xNN> tokens. Read exactly, as the tokenizers library runs it, in plain
    Python: the text is cut only where no token spans the cut (before a "▁" that no token has a character in front
    of), and each distinct piece is merged once and remembered (tiktoken merges the pair with the lowest id, which
    is not this model's order, and cannot start from characters)."""

    def __init__(self, label, text, config):
        digest = hashlib.sha256(text.encode('utf-8')).hexdigest()[:12]
        self.name = f"{label.removesuffix('-' + digest)}-{digest}"
        self.spec = {'name': self.name, 'json': text}
        model, vocab = config['model'], config['model'].get('vocab') or {}
        self.vocab, self.ignore_merges = vocab, model.get('ignore_merges')
        self.byte_ids = [vocab.get(f'<0x{b:02X}>') for b in range(256)]
        if None in self.byte_ids:
            raise ValueError(f"tokenizer {label}: byte_fallback without all 256 <0xNN> byte tokens")
        self.merges = {}  # (left id, right id) -> (rank, id of the two joined)
        for rank, merge in enumerate(model.get('merges') or []):
            left, right = merge.split(' ') if isinstance(merge, str) else merge
            if left not in vocab or right not in vocab or left + right not in vocab:
                raise ValueError(f"tokenizer {label}: merge {rank} ({left} {right}) joins tokens it does not have")
            self.merges[vocab[left], vocab[right]] = (rank, vocab[left + right])
        added = config.get('added_tokens') or []
        self.specials = {token['content']: token['id'] for token in added}
        self.special_ids = {token['id'] for token in added if token.get('special', True)}
        self.bytes_of = {id: bytes([int(BYTE_TOKEN.fullmatch(token)[1], 16)]) if BYTE_TOKEN.fullmatch(token)
                         else token.replace(SPACE, ' ').encode('utf-8') for token, id in vocab.items()}
        self.bytes_of.update({id: content.encode('utf-8') for content, id in self.specials.items()})
        self.vocab_size = max(self.bytes_of) + 1
        self.eot_id = next((self.specials.get(t, vocab.get(t)) for t in ('<eos>', '</s>', *END_OF_TEXT_TOKENS)
                            if t in self.specials or t in vocab), None)
        if self.eot_id is None:
            raise ValueError(f"tokenizer {label}: it has no end-of-text token (<eos>, </s>)")
        self.prepend = self.spaces(config, label)
        self.strip = any(step.get('type') == 'Strip' and step.get('start') for step in steps_of(config.get('decoder'),
                                                                                              'decoders'))
        # a token with a character before a "▁" (not a "▁" itself) may span such a place: the text is cut at others
        joined = {token[i - 1] for token in vocab for i in range(1, len(token)) if token[i] == SPACE != token[i - 1]}
        self.cut = re.compile(f"(?<=[^{re.escape(''.join(sorted(joined | {SPACE})))}])(?={SPACE})")
        self.specials_split = re.compile('(' + '|'.join(map(re.escape, sorted(self.specials, key=len, reverse=True)))
                                         + ')') if self.specials else None
        self.cache = {}

    @staticmethod
    def spaces(config, label):
        """Where the "▁" that opens a text comes from: 'always' (Llama 2's Prepend normalizer, before each part
        between special tokens), 'first' (Metaspace's, before the text's first part) or 'never' (Gemma); refuses the
        rest."""
        norms = [(step.get('type'), step.get('prepend'), (step.get('pattern') or {}).get('String'), step.get('content'))
                 for step in steps_of(config.get('normalizer'), 'normalizers')]
        pre = steps_of(config.get('pre_tokenizer'), 'pretokenizers')
        replaced = ('Replace', None, ' ', SPACE) in norms
        if norms in ([('Replace', None, ' ', SPACE)], [('Prepend', SPACE, None, None), ('Replace', None, ' ', SPACE)]):
            if all(step.get('type') == 'Split' and step.get('pattern') == {'String': ' '} for step in pre):
                return 'always' if len(norms) == 2 else 'never'
        elif not norms and len(pre) == 1 and pre[0].get('type') == 'Metaspace' and not pre[0].get('split', True) \
                and pre[0].get('replacement') == SPACE:
            return pre[0].get('prepend_scheme', 'always')
        raise ValueError(f"tokenizer {label}: a byte-fallback BPE whose normalizer / pre-tokenizer is not "
                         f"{'Gemma' if replaced else 'Gemma, Llama 2 or Mistral'}'s (a space as \"▁\", no split)")

    def encode_piece(self, piece):
        """The tokens of one piece: its characters (or their bytes), then the listed merges, the earliest listed
        first (leftmost first among equals), one at a time, as the tokenizers library's BPE."""
        if self.ignore_merges and piece in self.vocab:
            return [self.vocab[piece]]
        ids = []
        for char in piece:
            if char in self.vocab:
                ids.append(self.vocab[char])
            else:
                ids.extend(self.byte_ids[b] for b in char.encode('utf-8'))
        while len(ids) > 1:
            (rank, joined), i = min((self.merges.get(pair, (math.inf, 0)), i)
                                    for i, pair in enumerate(zip(ids, ids[1:])))
            if rank == math.inf:
                break
            ids[i:i + 2] = [joined]
        return ids

    def encode(self, text):
        ids, parts = [], self.specials_split.split(text) if self.specials_split else [text]
        for i, part in enumerate(parts):  # odd parts are special tokens
            if i % 2:
                ids.append(self.specials[part])
                continue
            if not part:
                continue
            part = (SPACE if self.prepend == 'always' or (self.prepend == 'first' and i == 0) else '') \
                + part.replace(' ', SPACE)
            for piece in self.cut.split(part):
                if piece not in self.cache:
                    if len(self.cache) > 100_000:
                        self.cache.clear()
                    self.cache[piece] = self.encode_piece(piece)
                ids.extend(self.cache[piece])
        return ids

    def decode_bytes(self, ids):
        text = b''.join(self.bytes_of[id] for id in ids)
        return text[1:] if self.strip and text.startswith(b' ') else text  # Llama 2's decoder: Strip(1)

    def decode(self, ids):
        return self.decode_bytes(ids).decode('utf-8', errors='replace')


def read_tokenizer_json(label, text):
    """A tokenizer.json's tokenizer: a byte-level BPE (JsonTokenizer), or a SentencePiece-style one with byte
    fallback (SentencePieceBPE)."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer {label}: not valid JSON ({e}); give a Hugging Face tokenizer.json") from None
    model = config.get('model') if isinstance(config, dict) else None
    if isinstance(model, dict) and model.get('type') == 'BPE' and model.get('byte_fallback'):
        return SentencePieceBPE(label, text, config)
    return JsonTokenizer(label, text)


class GPT2Tokenizer(JsonTokenizer):
    """GPT-2's byte-pair encoding (book ch. 2.5): 50,257 tokens, the ranks from tiktoken's own files."""
    name = spec = 'gpt2'
    vocab_size, eot_id, special_ids, forms = 50257, 50256, {50256}, []

    def __init__(self):
        import tiktoken
        try:
            self.enc = tiktoken.get_encoding('gpt2')
        except Exception as e:
            raise OSError(f"GPT-2's BPE files could not be loaded ({type(e).__name__}); go online once, "
                          "or set TIKTOKEN_CACHE_DIR to a folder holding them, or use --tokenizer=bytes") from None


def bpe_json(ranks, merges, pattern, special_tokens, ignore_merges=False):
    """Hugging Face's tokenizer.json text for a byte-level BPE, laid out as Llama 3's: ranks {token bytes: id} and
    merges [(bytes, bytes)] spelled in GPT-2's byte alphabet, `pattern` as the pre-tokenizer's Split,
    special_tokens {text: id} as added tokens."""
    alphabet = byte_to_unicode()
    spell = lambda token: ''.join(alphabet[b] for b in token)  # noqa: E731
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
    """Llama 3's original/tokenizer.model (tiktoken's format: a base64 token and its rank per line) as tokenizer.json
    text, converted as Hugging Face does: GPT-4's split, the 256 special tokens after the ranks (<|begin_of_text|> =
    128000, ...), and every split of a token into two tokens as a merge (tiktoken merges any pair that makes one)."""
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


def bpe_merges(ranks):
    """The merge that made each token of tiktoken's ranks {token bytes: id}, in id order (the merges list that
    tiktoken's files leave out): BPE replayed on a token's bytes with only lower-ranked tokens ends in the two
    parts its own merge joined."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pair_rank = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            i = pair_rank.index(min(pair_rank))
            if pair_rank[i] >= rank:
                raise ValueError(f"token {token!r} cannot be made by merging lower-ranked tokens")
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append(tuple(parts))
    return merges


def tokenizer_json(tokenizer):
    """Hugging Face's tokenizer.json text for any tokenizer here (for export.py): a tokenizer.json-based one
    returns its own; GPT-2's is rebuilt from tiktoken's ranks; the byte tokenizer is a BPE of 256 one-byte tokens
    with no merges, spelled in GPT-2's byte alphabet so that id = byte value, and end-of-text as id 256."""
    if isinstance(tokenizer, ByteTokenizer):
        return bpe_json({bytes([b]): b for b in range(256)}, [], GPT2_PATTERN, {EOT: tokenizer.eot_id})
    if isinstance(tokenizer, GPT2Tokenizer):
        ranks = {tokenizer.enc.decode_single_token_bytes(i): i for i in range(tokenizer.eot_id)}
        config = json.loads(bpe_json(ranks, bpe_merges(ranks), GPT2_PATTERN, {EOT: tokenizer.eot_id}))
        config['pre_tokenizer'] = {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True,
                                   'use_regex': True}  # GPT-2's own layout
        return json.dumps(config, ensure_ascii=False, indent=1)
    return tokenizer.spec['json']


def get_tokenizer(spec):
    """bytes | gpt2 | a published model's name or hub id (qwen3-0.6b, Qwen/Qwen3-0.6B: its tokenizer.json is
    downloaded once, without the weights) | a folder holding tokenizer.json (or Llama 3's original/tokenizer.model),
    or such a file | {'name', 'json': tokenizer.json text}: a tokenizer's .spec, as checkpoints carry it."""
    if isinstance(spec, dict):
        if not isinstance(spec.get('name'), str) or not isinstance(spec.get('json'), str):
            raise ValueError("a tokenizer given as a dict needs {'name': str, 'json': tokenizer.json text}")
        return read_tokenizer_json(spec['name'], spec['json'])
    if spec == 'bytes':
        return ByteTokenizer()
    if spec == 'gpt2':
        return GPT2Tokenizer()
    if spec == 'bpe':
        raise ValueError("the bpe tokenizer is trained per data set: prepare_data.py --tokenizer=bpe makes it, and "
                         "data_tokenizer(data_dir) or its data_dir/tokenizer.json loads it")
    path = Path(spec)
    if not path.exists():  # qwen3-0.6b, a hub id: its tokenizer.json, downloaded by weights.py (which loads torch)
        from weights import is_hub_name, pretrained_path
        path = pretrained_path(spec, weights=False) if is_hub_name(spec) else path
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
        return read_tokenizer_json(label, path.read_text(encoding='utf-8'))
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
    """Learn a byte-level BPE from the strings in `texts` and return it as tokenizer.json text: ids 0-255 the bytes,
    then vocab_size - 257 merges, then end-of-text. The book's BPETokenizerSimple.train, except: it merges bytes, not
    characters, so any text encodes; the text is first cut with `pattern` into chunks (words with their leading
    space, numbers, punctuation, as tiktoken does), each distinct chunk kept once with its count (memory grows with
    the distinct chunks, not the text); after a merge only the chunks that held the pair are recounted; the most
    frequent pair comes off a heap (ties: the smallest pair of ids, so the result does not depend on dict order)."""
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

PROMPT_STYLES = ('alpaca', 'phi3', 'llama3', 'chatml', 'gemma')
ALPACA_OPENING = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                  "the request.")
ROLES = ('system', 'user', 'assistant')
CHAT_FORMATS = {  # style: (start of a conversation, each role's turn, the header that asks for the assistant's turn,
    # what joins an instruction to its input in a user turn)
    'alpaca': ('', {'system': '{}', 'user': '\n\n### Instruction:\n{}', 'assistant': '\n\n### Response:\n{}'},
               '\n\n### Response:\n', '\n\n### Input:\n'),
    'phi3': ('', {'system': '<|system|>\n{}\n', 'user': '<|user|>\n{}\n', 'assistant': '<|assistant|>:\n{}\n'},
             '<|assistant|>:\n', '\n'),
    'llama3': ('<|begin_of_text|>',
               {role: f'<|start_header_id|>{role}<|end_header_id|>\n\n{{}}<|eot_id|>' for role in ROLES},
               '<|start_header_id|>assistant<|end_header_id|>\n\n', '\n\n'),
    'chatml': ('', {role: f'<|im_start|>{role}\n{{}}<|im_end|>\n' for role in ROLES}, '<|im_start|>assistant\n',
               '\n\n'),
    # Gemma 3's: the assistant is 'model', and a system message opens the first user turn (format_chat)
    'gemma': ('<bos>', {'user': '<start_of_turn>user\n{}<end_of_turn>\n', 'assistant':
                        '<start_of_turn>model\n{}<end_of_turn>\n', 'system': '<start_of_turn>user\n{}<end_of_turn>\n'},
              '<start_of_turn>model\n', '\n\n'),
}
# what follows a response in training text (and stops generation): the book's templates end with the tokenizer's
# end-of-text (this is its GPT-2 spelling; response_end_id gives any tokenizer's), the chat formats end the turn
RESPONSE_END = {'alpaca': EOT, 'phi3': EOT, 'llama3': '<|eot_id|>', 'chatml': '<|im_end|>', 'gemma': '<end_of_turn>'}


def check_style(style):
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; use {', '.join(PROMPT_STYLES)}")


def format_prompt(entry, style='alpaca'):
    """The prompt a model continues with its response to an {instruction, input} entry: a chat of one user turn, so
    training, generation and the chat share one template (alpaca: the book's, 7.2; phi3: its exercise 7.1; llama3
    and chatml: chat formats). Training text = format_prompt(entry) + entry['output'] + RESPONSE_END[style]."""
    check_style(style)
    text = entry['instruction'] + (CHAT_FORMATS[style][3] + entry['input'] if entry.get('input') else '')
    return format_chat([{'role': 'user', 'content': text}], style)


def format_input(entry, style='alpaca'):
    """The entry without the header that asks for a response (the book's format_input, 7.2)."""
    return format_prompt(entry, style).removesuffix(CHAT_FORMATS[style][2])


def format_chat(messages, style='alpaca'):
    """A conversation [{'role': 'system' | 'user' | 'assistant', 'content': text}, ...] as one prompt that ends with
    the assistant's header, ready for generation. alpaca opens with the book's sentence unless a system message
    takes its place; no other style adds a default system message (Qwen's and SmolLM2's own templates do)."""
    check_style(style)
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get('role') in ROLES and isinstance(message.get('content'), str)):
            raise ValueError(f"chat message {i} is not {{'role': 'system' | 'user' | 'assistant', 'content': text}}")
    start, turns, header, _ = CHAT_FORMATS[style]
    if style == 'alpaca' and (not messages or messages[0]['role'] != 'system'):
        start = ALPACA_OPENING
    if style == 'gemma' and len(messages) > 1 and [m['role'] for m in messages[:2]] == ['system', 'user']:
        messages = [{'role': 'user', 'content': messages[0]['content'] + '\n\n' + messages[1]['content']},
                    *messages[2:]]
    return start + ''.join(turns[message['role']].format(message['content']) for message in messages) + header


def fit_chat(messages, tokenizer, style, room):
    """The conversation's token ids in `style`, at most `room` of them: the oldest messages after the opening system
    messages are dropped, as few as possible, the kept part starting at a user turn (or at the last message); if
    the last message alone is still too long, its end is kept. Returns (ids, messages dropped, whether ids were cut)."""
    encode = lambda kept: tokenizer.encode(format_chat(kept, style))  # noqa: E731
    ids = encode(messages)
    if len(ids) <= room:
        return ids, 0, False
    opening = next((i for i, m in enumerate(messages) if m['role'] != 'system'), len(messages) - 1)
    # where the kept part may start; dropping more never makes it longer, so a bisection finds the fewest
    # to drop in a few encodings even for a long conversation
    starts = [i for i in range(opening + 1, len(messages) - 1) if messages[i]['role'] == 'user']
    starts.append(len(messages) - 1)
    lo, hi = 0, len(starts) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if len(encode(messages[:opening] + messages[starts[mid]:])) <= room:
            hi = mid
        else:
            lo = mid + 1
    ids = encode(messages[:opening] + messages[starts[lo]:])
    return ids[-room:], starts[lo] - opening, len(ids) > room


def chat_style_of(tokenizer, prompt_style=None):
    """The chat format: the one a checkpoint was fine-tuned with, else the one its tokenizer has tokens for."""
    specials = getattr(tokenizer, 'specials', None) or getattr(getattr(tokenizer, 'enc', None), 'special_tokens_set',
                                                                set())
    return prompt_style or ('llama3' if '<|start_header_id|>' in specials else 'chatml' if '<|im_start|>' in specials
                            else 'gemma' if '<start_of_turn>' in specials else 'alpaca')


def response_end_id(tokenizer, style):
    """The token id that ends a response in `style`: the tokenizer's end-of-text for alpaca and phi3, the
    end-of-turn token for llama3 and chatml, which only a tokenizer that has it (Llama 3; Qwen, SmolLM2) knows."""
    check_style(style)
    if RESPONSE_END[style] == EOT:
        return tokenizer.eot_id
    ids = tokenizer.encode(RESPONSE_END[style])
    if len(ids) != 1 or ids[0] not in tokenizer.special_ids:
        family = {'llama3': 'Llama 3', 'gemma': 'Gemma 3'}.get(style, 'Qwen or SmolLM2')
        raise ValueError(f"the {style} prompt style ends responses with {RESPONSE_END[style]}, which the "
                         f"{tokenizer.name} tokenizer has no token for; use {family}'s tokenizer, or alpaca or phi3")
    return ids[0]
