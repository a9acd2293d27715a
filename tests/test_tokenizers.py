"""Tokenizers beyond bytes and GPT-2: any byte-level BPE tokenizer.json (Llama 3, Qwen2/2.5/3, SmolLM2, GPT-2
layouts; fixtures from tests/fixtures/make_tokenizer_fixtures.py) read into tiktoken, Llama 3's tokenizer.model,
our own BPE trainer, wide (uint32) shards, and the chat formats. The tests that run Hugging Face's tokenizers
or transformers themselves skip where those are not installed; the others compare with ids they stored."""
import json
import random
from collections import Counter

import numpy as np
import pytest

import prepare_data
from conftest import FIXTURES, SHARED, assert_one_line_error, needs_gpt2_bpe, run_here, run_script
from prepare_data import data_tokenizer, find_shards, prepare, read_meta, read_shard, write_shard
import tokenizer
from tokenizer import (EOT, LLAMA3_SPECIAL_TOKENS, format_chat, format_prompt, get_tokenizer, response_end_id,
                       token_bytes, train_bpe)

TOKENIZERS = FIXTURES / 'tokenizers'
EXPECTED = json.loads((TOKENIZERS / 'expected.json').read_text(encoding='utf-8'))
FAMILIES = sorted(EXPECTED['families'])  # llama3, qwen2, smollm2, gpt2, and bpe (ours)
VERDICT = SHARED / 'data' / 'the-verdict.txt'


def pydoc_text():
    from pydoc_data.topics import topics
    return ''.join(topics[k] for k in sorted(topics))


# -------------------------------------------------------------------- tokenizer.json -> tiktoken

@pytest.mark.parametrize('family', FAMILIES)
def test_fixture_ids_equal_the_tokenizers_library(family):
    tok = get_tokenizer(TOKENIZERS / family)
    expected = EXPECTED['families'][family]
    for text, ids, decoded in zip(EXPECTED['texts'], expected['ids'], expected['decoded']):
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == tok.decode_bytes(ids).decode() == decoded
        assert decoded == text or family == 'qwen2'  # Qwen's NFC composes 'e\u0301' to 'é' (not after '<|im_end|>')


def test_each_family_has_its_end_of_text_and_special_ids():
    llama3, qwen2, smollm2 = (get_tokenizer(TOKENIZERS / f) for f in ('llama3', 'qwen2', 'smollm2'))
    base = llama3.encode('<|begin_of_text|>')[0]  # Llama 3's 256 special tokens follow the vocabulary
    assert llama3.encode('<|end_of_text|><|start_header_id|><|eot_id|>') == [base + 1, base + 6, base + 9]
    assert llama3.eot_id == base + 1 and len(llama3.special_ids) == 256 and llama3.vocab_size == base + 256
    assert qwen2.eot_id == qwen2.encode(EOT)[0]
    assert qwen2.encode('<|im_start|><|im_end|>') == [qwen2.eot_id + 1, qwen2.eot_id + 2]
    assert smollm2.eot_id == 0 and smollm2.special_ids == {0, 1, 2}  # SmolLM2's specials come first
    assert smollm2.encode('a') != [ord('a')]  # so its byte tokens are not byte values: tiktoken ranks are ids


def test_spec_rebuilds_the_same_tokenizer_and_names_the_content():
    tok = get_tokenizer(TOKENIZERS / 'qwen2' / 'tokenizer.json')
    assert tok.name.startswith('qwen2-') and tok.spec == {'name': tok.name, 'json': tok.spec['json']}
    again = get_tokenizer(json.loads(json.dumps(tok.spec)))  # as a checkpoint or meta.json carries it
    assert again.name == tok.name and again.encode('Héllo 123 <|im_end|>') == tok.encode('Héllo 123 <|im_end|>')
    changed = get_tokenizer({'name': tok.name, 'json': tok.spec['json'].replace('"<|im_end|>"', '"<|im_stop|>"')})
    assert changed.name != tok.name and changed.name.startswith('qwen2-')
    assert get_tokenizer('bytes').spec == 'bytes'


def test_llama3_tokenizer_model_reads_as_its_tokenizer_json():
    from_json = get_tokenizer(TOKENIZERS / 'llama3')
    from_model = get_tokenizer(TOKENIZERS / 'llama3' / 'original' / 'tokenizer.model')
    for text in EXPECTED['texts']:
        assert from_model.encode(text) == from_json.encode(text)
    assert from_model.eot_id == from_json.eot_id and from_model.special_ids == from_json.special_ids
    assert json.loads(from_model.spec['json'])['model']['ignore_merges']  # carried as a tokenizer.json


@needs_gpt2_bpe
def test_gpt2s_own_files_as_a_tokenizer_json_equal_tiktoken():
    """The real 50,000 merges: GPT-2's encoder.json + vocab.bpe (tiktoken's cache) laid out as Hugging Face's
    tokenizer.json (a ByteLevel pre-tokenizer alone) give tiktoken's GPT-2 ids."""
    import hashlib
    import os
    from pathlib import Path

    def cached(url):
        return Path(os.environ['TIKTOKEN_CACHE_DIR']) / hashlib.sha1(url.encode()).hexdigest()
    base = 'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/'
    if 'TIKTOKEN_CACHE_DIR' not in os.environ or not cached(base + 'vocab.bpe').is_file():
        pytest.skip('GPT-2 BPE files not in a TIKTOKEN_CACHE_DIR')
    merges = cached(base + 'vocab.bpe').read_text(encoding='utf-8').split('\n')[1:]
    config = {'model': {'type': 'BPE', 'vocab': json.loads(cached(base + 'encoder.json').read_text(encoding='utf-8')),
                        'merges': [m for m in merges if m]},
              'pre_tokenizer': {'type': 'ByteLevel', 'add_prefix_space': False, 'use_regex': True},
              'added_tokens': [{'id': 50256, 'content': EOT, 'special': True}]}
    tok, gpt2 = get_tokenizer({'name': 'gpt2-json', 'json': json.dumps(config)}), get_tokenizer('gpt2')
    text = pydoc_text()[:300_000] + ''.join(EXPECTED['texts'])
    assert tok.encode(text) == gpt2.encode(text) and (tok.vocab_size, tok.eot_id) == (50257, 50256)


def test_token_bytes():
    assert token_bytes(get_tokenizer('bytes')).tolist() == [1] * 256 + [0]
    for family in ('llama3', 'smollm2'):
        tok = get_tokenizer(TOKENIZERS / family)
        lengths = token_bytes(tok)
        assert len(lengths) == tok.vocab_size and not lengths[sorted(tok.special_ids)].any()
        text = EXPECTED['texts'][3] + EXPECTED['texts'][-1]
        assert lengths[tok.encode(text)].sum() == len(text.encode('utf-8'))


@needs_gpt2_bpe
def test_token_bytes_gpt2():
    lengths = token_bytes(get_tokenizer('gpt2'))
    assert len(lengths) == 50257 and lengths[50256] == 0 and lengths[:256].tolist() == [1] * 256
    assert lengths[15496] == len('Hello')


def qwen3_layout():
    """The qwen2 fixture with Qwen3's reasoning tokens added as Qwen3's tokenizer.json has them: added tokens
    that are not special (special false, normalized false)."""
    config = json.loads((TOKENIZERS / 'qwen2' / 'tokenizer.json').read_text(encoding='utf-8'))
    for i, content in enumerate(('<think>', '</think>')):
        config['added_tokens'].append({'id': 659 + i, 'content': content, 'single_word': False, 'lstrip': False,
                                       'rstrip': False, 'normalized': False, 'special': False})
    return json.dumps(config)


def test_non_special_added_tokens_are_one_id_each_and_count_as_text():
    tok, qwen2 = get_tokenizer({'name': 'qwen3', 'json': qwen3_layout()}), get_tokenizer(TOKENIZERS / 'qwen2')
    think, end_think = 659, 660
    assert tok.encode('<think>') == [think]
    assert tok.encode('a</think>b') == [*qwen2.encode('a'), end_think, *qwen2.encode('b')]
    # as the tokenizers library: the added tokens are cut out first, the text between encoded on its own
    text = '<think>\nLet me see: 12 + 30 = 42.</think>\n\nThe answer is 42.<|im_end|>'
    ids = [think, *qwen2.encode('\nLet me see: 12 + 30 = 42.'), end_think,
           *qwen2.encode('\n\nThe answer is 42.<|im_end|>')]
    assert tok.encode(text) == ids and tok.decode(ids) == text
    assert tok.special_ids == qwen2.special_ids and tok.vocab_size == 661  # <think> is text, not a control token
    lengths = token_bytes(tok)
    assert lengths[think] == len('<think>') and lengths[end_think] == len('</think>')  # bits per byte count them


def test_non_special_added_tokens_equal_the_tokenizers_library():
    tokenizers = pytest.importorskip('tokenizers')
    tok, hf = get_tokenizer({'name': 'qwen3', 'json': qwen3_layout()}), tokenizers.Tokenizer.from_str(qwen3_layout())
    for sample in random_texts(seed=11, n=100):
        sample = sample[:10] + '<think>' + sample[10:30] + '</think>' + sample[30:]
        assert tok.encode(sample) == hf.encode(sample, add_special_tokens=False).ids, sample


LLAMA2_STYLE = {  # Llama 2's tokenizer.json in miniature: a "▁" prepended, spaces as "▁", byte fallback, Strip(1)
    'version': '1.0', 'added_tokens': [{'id': i, 'content': t, 'single_word': False, 'lstrip': False, 'rstrip': False,
                                        'normalized': False, 'special': True} for i, t in enumerate(['<unk>', '<s>',
                                                                                                     '</s>'])],
    'normalizer': {'type': 'Sequence', 'normalizers': [{'type': 'Prepend', 'prepend': '▁'},
                                                       {'type': 'Replace', 'pattern': {'String': ' '}, 'content': '▁'}]},
    'pre_tokenizer': None, 'post_processor': None,
    'decoder': {'type': 'Sequence', 'decoders': [{'type': 'Replace', 'pattern': {'String': '▁'}, 'content': ' '},
                                                 {'type': 'ByteFallback'}, {'type': 'Fuse'},
                                                 {'type': 'Strip', 'content': ' ', 'start': 1, 'stop': 0}]},
    'model': {'type': 'BPE', 'dropout': None, 'unk_token': '<unk>', 'continuing_subword_prefix': None,
              'end_of_word_suffix': None, 'fuse_unk': True, 'byte_fallback': True, 'ignore_merges': False,
              'vocab': {'<unk>': 0, '<s>': 1, '</s>': 2, **{f'<0x{b:02X}>': 3 + b for b in range(256)}, '▁': 259,
                        't': 260, 'h': 261, 'e': 262, '▁t': 263, '▁th': 264, '▁the': 265, 'he': 266},
              'merges': ['▁ t', '▁t h', '▁th e', 'h e']}}


def test_llama2_style_byte_fallback_tokenizer_is_read(tmp_path):
    """Llama 2's and Mistral's tokenizer.json (SentencePiece BPE: '▁' prepended and for spaces, <0x41> byte tokens for
    text its vocabulary lacks) is read by the same reader as Gemma's; an unknown normalizer is refused in one line."""
    (tmp_path / 'llama2').mkdir()
    (tmp_path / 'llama2' / 'tokenizer.json').write_text(json.dumps(LLAMA2_STYLE), encoding='utf-8')
    tok = get_tokenizer(tmp_path / 'llama2')
    assert tok.encode('the thhe') == [265, 264, 266]  # '▁the', '▁th', 'he': merges in listed order
    assert tok.encode('hé</s>the') == [259, 261, 3 + 0xC3, 3 + 0xA9, 2, 265]  # 'é' by its two bytes
    assert tok.decode(tok.encode('the thé')) == 'the thé' and tok.eot_id == 2  # Strip(1): the prepended space
    texts = ['the thhe', 'hé</s>the', ' the  t', '', 'x<s>y', 'théthe 你']
    tokenizers = pytest.importorskip('tokenizers')
    hf = tokenizers.Tokenizer.from_str(json.dumps(LLAMA2_STYLE))
    for text in texts:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False), text
    config = {**LLAMA2_STYLE, 'normalizer': {'type': 'NFKC'}}
    (tmp_path / 'llama2' / 'tokenizer.json').write_text(json.dumps(config), encoding='utf-8')
    (tmp_path / 'in.txt').write_text('some text\n' * 10, encoding='utf-8')
    assert_one_line_error(run_here('prepare_data.py', f'--input={tmp_path}/in.txt',
                                   f'--tokenizer={tmp_path / "llama2"}', f'--data_dir={tmp_path}/d'),
                          'a byte-fallback BPE whose normalizer / pre-tokenizer is not Gemma, Llama 2 or Mistral')


GEMMA = TOKENIZERS / 'gemma3'
GEMMA_EXPECTED = json.loads((GEMMA / 'expected.json').read_text(encoding='utf-8'))


def test_gemma_ids_equal_the_tokenizers_library_and_decode_back():
    tok = get_tokenizer(GEMMA)
    assert type(tok).__name__ == 'SentencePieceBPE' and len(GEMMA_EXPECTED) >= 60
    for e in GEMMA_EXPECTED:
        assert tok.encode(e['text']) == e['ids'], e['text']
        assert tok.decode(e['ids']) == tok.decode_bytes(e['ids']).decode() == e['decoded']
        assert e['decoded'] == e['text'] or '▁' in e['text']  # a "▁" of the text decodes to a space, as there
    fallback = set(range(7, 7 + 256))  # the <0xNN> tokens
    spelled = {e['text'] for e in GEMMA_EXPECTED if fallback & set(e['ids'])}
    assert 'Only bytes can spell these: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 𓀀 ᚠᛇᚻ ⸘' in spelled and not fallback & set(tok.encode('你好，世界'))
    assert tok.encode('<start_of_turn>user\nHi<end_of_turn>')[::len(tok.encode('user\nHi')) + 1] == [5, 6]
    assert tok.eot_id == 1 and {0, 1, 2, 3, 4, 5, 6} == tok.special_ids and tok.vocab_size == 1024
    assert token_bytes(tok)[tok.encode(' the')[0]] == 4 and token_bytes(tok)[5] == 0


def test_gemma_random_texts_equal_the_tokenizers_library():
    tokenizers = pytest.importorskip('tokenizers')
    hf = tokenizers.Tokenizer.from_file(str(GEMMA / 'tokenizer.json'))
    tok = get_tokenizer(GEMMA)
    extra = ['<start_of_turn>', '<end_of_turn>', '<eos>', '<bos>', '▁', '▁▁', 'ꙮ', '𝔘', '<0x41>', ' the', ' thou']
    for text in random_texts(seed=39, n=400) + [t + x for t in random_texts(seed=40, n=100) for x in extra[:2]] \
            + extra + [pydoc_text()[:50_000]]:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False), text


def test_unreadable_tokenizers_give_one_clear_error(tmp_path):
    config = json.loads((TOKENIZERS / 'gpt2' / 'tokenizer.json').read_text(encoding='utf-8'))

    def load(**changes):
        return get_tokenizer({'name': 't', 'json': json.dumps({**config, **changes})})
    with pytest.raises(ValueError, match='not a byte-level BPE'):
        load(model={**config['model'], 'type': 'WordPiece'})
    with pytest.raises(ValueError, match='no ByteLevel step'):
        load(pre_tokenizer={'type': 'Metaspace', 'replacement': '▁'})
    with pytest.raises(ValueError, match=r'pre-tokenizer Punctuation \+ ByteLevel is not supported'):
        load(pre_tokenizer={'type': 'Sequence', 'pretokenizers': [{'type': 'Punctuation'}, config['pre_tokenizer']]})
    with pytest.raises(ValueError, match='normalizer Lowercase is not supported'):
        load(normalizer={'type': 'Lowercase'})
    with pytest.raises(ValueError, match="not spelled in GPT-2's byte alphabet"):
        load(model={**config['model'], 'vocab': {**config['model']['vocab'], '▁the': 9999}})
    with pytest.raises(ValueError, match='in id order'):
        load(model={**config['model'], 'merges': config['model']['merges'][::-1]})
    with pytest.raises(ValueError, match='made by no merge'):
        load(model={**config['model'], 'merges': config['model']['merges'][:-1]})
    with pytest.raises(ValueError, match='no end-of-text token'):
        load(added_tokens=[])
    with pytest.raises(ValueError, match='not valid JSON'):
        get_tokenizer({'name': 't', 'json': '{"model": '})
    (tmp_path / 'sp').mkdir()
    (tmp_path / 'sp' / 'tokenizer.model').write_bytes(b'\n\x0b<unk>\x15\x00\x00\x00\x00\x18\x02\n\x07<s>')
    with pytest.raises(ValueError, match='SentencePiece'):
        get_tokenizer(tmp_path / 'sp' / 'tokenizer.model')
    with pytest.raises(ValueError, match='holds no tokenizer.json'):
        get_tokenizer(tmp_path / 'sp')
    with pytest.raises(ValueError, match='unknown tokenizer'):
        get_tokenizer(str(tmp_path / 'missing'))
    with pytest.raises(ValueError, match='trained per data set'):
        get_tokenizer('bpe')


# -------------------------------------------------------------------- our own BPE

def test_train_bpe_learns_merges_any_text_encodes_and_is_deterministic():
    text = VERDICT.read_text(encoding='utf-8') if VERDICT.exists() else pydoc_text()[:20000]
    first = train_bpe([text], 600, quiet=True)
    assert train_bpe([text], 600, quiet=True) == first
    tok = get_tokenizer({'name': 'bpe600', 'json': first})
    assert tok.vocab_size == 600 and tok.eot_id == 599 and tok.special_ids == {599}
    assert len(tok.encode(text)) < 0.45 * len(text.encode('utf-8'))  # merges compress the text learned from
    odd = 'ünïcödé 😀 and new words: zyxwvut 98765 <|endoftext|>'
    ids = tok.encode(odd)
    assert tok.decode(ids) == odd and ids[-1] == 599 and tok.encode('a') == [ord('a')]  # bytes keep their values
    config = json.loads(first)
    assert config['pre_tokenizer']['pretokenizers'][0]['pattern']['Regex'] == tokenizer.GPT4_PATTERN
    assert len(config['model']['merges']) == 600 - 257


def naive_bpe(text, n_merges, pattern):
    """The book's BPE training the plainest way: before every merge, count every adjacent pair in every chunk
    of the text again; merge the most frequent (ties: the smallest pair of ids) left to right everywhere.
    Returns the merges as (bytes, bytes) and how many of them a tie decided."""
    import regex
    words = [list(chunk.encode('utf-8')) for chunk in regex.findall(pattern, text)]
    tokens, merges, ties = [bytes([b]) for b in range(256)], [], 0
    for _ in range(n_merges):
        counts = Counter(pair for word in words for pair in zip(word, word[1:]))
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        ties += list(counts.values()).count(counts[best]) > 1
        for i, word in enumerate(words):
            merged, j = [], 0
            while j < len(word):
                if tuple(word[j:j + 2]) == best:
                    merged.append(len(tokens))
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            words[i] = merged
        merges.append((tokens[best[0]], tokens[best[1]]))
        tokens.append(tokens[best[0]] + tokens[best[1]])
    return merges, ties


def test_train_bpe_merges_equal_a_naive_recount_of_every_pair():
    """train_bpe counts each distinct chunk once and updates only the chunks a merge touched; a recount of
    everything before each merge must pick the same 300 merges in the same order."""
    text = pydoc_text()[:30000] + ' aaaaaaa bbbbbb aaaa' * 20  # runs of one byte: overlapping pairs
    expected, ties = naive_bpe(text, 300, tokenizer.GPT4_PATTERN)
    assert ties > 50 and any(first == second for first, second in expected)  # the tie rule and 'aa' + 'aa' matter
    to_byte = {char: b for b, char in tokenizer.byte_to_unicode().items()}
    merges = json.loads(train_bpe([text], 257 + 300, quiet=True))['model']['merges']
    ours = [tuple(bytes(to_byte[char] for char in part) for part in merge.split(' ')) for merge in merges]
    first_difference = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), None)
    assert first_difference is None and len(ours) == 300, (first_difference, ours[first_difference or 0])


def test_train_bpe_refuses_sizes_it_cannot_make():
    with pytest.raises(ValueError, match='at least 257'):
        train_bpe(['some text'], 256)
    with pytest.raises(ValueError, match='more than the text can fill'):
        train_bpe(['a tiny text'], 1000)


def test_bpe_data_set_learns_from_the_training_split_only(tmp_path):
    train_part = ''.join(f"the river runs past stone number {i} and the cloud\n" for i in range(300))
    val_part = 'zebraquokka ' * 1000 + '\n'  # more frequent than any training word, but in the validation split only
    (tmp_path / 'in.txt').write_text(train_part + val_part, encoding='utf-8')
    out = prepare(input=str(tmp_path / 'in.txt'), tokenizer='bpe', vocab_size=400, data_dir=tmp_path / 'd',
                  val_fraction=len(val_part) / len(train_part + val_part), quiet=True)
    meta, tok = read_meta(out), data_tokenizer(out)
    assert meta['tokenizer'] == tok.name and tok.name.startswith('bpe400-')
    assert meta['tokenizer_file'] == 'tokenizer.json'
    assert len(tok.encode(' zebraquokka')) > 4  # never merged: that text was not learned from
    assert len(tok.encode(' river')) == 1
    train = np.asarray(read_shard(find_shards(out, 'train')[0]))
    assert read_shard(find_shards(out, 'train')[0]).dtype == np.uint16
    assert tok.decode(train.tolist()).startswith('the river runs past')
    stamp = (out / 'meta.json').stat().st_mtime_ns  # the same request again: nothing retrained
    prepare(input=str(tmp_path / 'in.txt'), tokenizer='bpe', vocab_size=400, data_dir=tmp_path / 'd',
            val_fraction=len(val_part) / len(train_part + val_part), quiet=True)
    assert (out / 'meta.json').stat().st_mtime_ns == stamp


def test_tokenizer_max_chars_caps_the_text_learned_from(tmp_path):
    first = ''.join(f"the river runs past stone number {i} and the cloud\n" for i in range(300))
    (tmp_path / 'in.txt').write_text(first + 'zebraquokka ' * 1000 + '\n', encoding='utf-8')
    for cap, learned in ((len(first), False), (10 * len(first), True)):
        out = prepare(input=str(tmp_path / 'in.txt'), tokenizer='bpe', vocab_size=400, tokenizer_max_chars=cap,
                      val_fraction=0.0, data_dir=tmp_path / str(cap), quiet=True)
        assert (len(data_tokenizer(out).encode(' zebraquokka')) <= 2) == learned


# -------------------------------------------------------------------- data sets with tokenizer.json, wide shards

def qwen_sized(tmp_path):
    """The qwen2 fixture with its special tokens where Qwen's sit (151643...): a vocabulary above 65,536 ids."""
    config = json.loads((TOKENIZERS / 'qwen2' / 'tokenizer.json').read_text(encoding='utf-8'))
    for i, token in enumerate(config['added_tokens']):
        token['id'] = 151643 + i
    (tmp_path / 'qwen').mkdir()
    (tmp_path / 'qwen' / 'tokenizer.json').write_text(json.dumps(config), encoding='utf-8')
    return tmp_path / 'qwen'


def test_wide_shard_round_trip(tmp_path):
    tokens = np.array([0, 151643, 70000, 5], dtype=np.uint32)
    write_shard(tmp_path / 'w.bin', tokens)
    header = np.fromfile(tmp_path / 'w.bin', dtype=np.int32, count=3)
    assert header.tolist() == [20240520, 2, 4] and (tmp_path / 'w.bin').stat().st_size == 1024 + 16
    shard = read_shard(tmp_path / 'w.bin')
    assert shard.dtype == np.uint32 and shard.tolist() == tokens.tolist()
    (tmp_path / 'c.bin').write_bytes((tmp_path / 'w.bin').read_bytes()[:-2])
    with pytest.raises(ValueError, match='c.bin is corrupt'):
        read_shard(tmp_path / 'c.bin')
    with pytest.raises(ValueError, match='need a uint32 array'):
        write_shard(tmp_path / 'x.bin', np.array([70000]))


def test_json_tokenizer_data_set_with_wide_tokens_in_parallel(tmp_path, monkeypatch):
    folder = qwen_sized(tmp_path)
    text = ''.join(f"Paragraph {i}: café, naïve — and 数字 {i * 7}.\n" for i in range(3000))
    (tmp_path / 'big.txt').write_text(text, encoding='utf-8')
    serial = prepare(input=str(tmp_path / 'big.txt'), tokenizer=str(folder), data_dir=tmp_path / 's', num_workers=1,
                     quiet=True)
    monkeypatch.setattr(prepare_data, 'PIECE_CHARS', 10_000)  # > 4 pieces: the spawned pool gets the tokenizer's spec
    parallel = prepare(input=str(tmp_path / 'big.txt'), tokenizer=str(folder), data_dir=tmp_path / 'p', num_workers=2,
                       quiet=True)
    meta, tok = read_meta(serial), data_tokenizer(serial)
    assert meta['vocab_size'] == 151646 and meta['eot_id'] == 151643 == tok.eot_id
    assert (serial / 'tokenizer.json').read_bytes() == (folder / 'tokenizer.json').read_bytes()
    for split in ('train', 'val'):
        a, b = read_shard(find_shards(serial, split)[0]), read_shard(find_shards(parallel, split)[0])
        assert a.dtype == np.uint32 and np.array_equal(a, b)
    train, val = (np.asarray(read_shard(find_shards(serial, s)[0])).tolist() for s in ('train', 'val'))
    assert tok.decode(train + val) == text + EOT
    (serial / 'tokenizer.json').write_text((folder / 'tokenizer.json').read_text(encoding='utf-8').replace(
        '"<|im_end|>"', '"<|im_stop|>"'), encoding='utf-8')
    with pytest.raises(ValueError, match='not the tokenizer the shards were made with'):
        data_tokenizer(serial)


def test_command_line_tokenizers_and_bad_values(tmp_path):
    (tmp_path / 'in.txt').write_text('a small text to learn from, and then some more.\n' * 20, encoding='utf-8')
    proc = run_script('prepare_data.py', f'--input={tmp_path}/in.txt', f'--tokenizer={TOKENIZERS / "llama3"}',
                      f'--data_dir={tmp_path}/l')
    assert proc.returncode == 0, proc.stderr
    assert read_meta(tmp_path / 'l')['tokenizer'].startswith('llama3-') and data_tokenizer(tmp_path / 'l').eot_id == 657
    assert_one_line_error(run_here('prepare_data.py', f'--input={tmp_path}/in.txt', '--tokenizer=bpe',
                                   '--vocab_size=200', f'--data_dir={tmp_path}/b'), 'at least 257')
    assert_one_line_error(run_here('prepare_data.py', f'--input={tmp_path}/in.txt', '--tokenizer=bpe',
                                   '--vocab_size=5000', f'--data_dir={tmp_path}/b'), 'more than the text can fill')
    assert_one_line_error(run_here('prepare_data.py', f'--input={tmp_path}/in.txt', '--tokenizer=bpe',
                                   '--tokenizer_max_chars=0', f'--data_dir={tmp_path}/b'), 'tokenizer_max_chars')
    assert_one_line_error(run_here('prepare_data.py', f'--input={tmp_path}/in.txt', f'--tokenizer={tmp_path}',
                                   f'--data_dir={tmp_path}/b'), 'holds no tokenizer.json')
    assert not (tmp_path / 'b' / 'meta.json').exists()


# -------------------------------------------------------------------- chat formats (ch07)

def test_chat_formats():
    entry = {'instruction': 'Name a color.', 'input': 'sky', 'output': 'Blue.'}
    assert format_prompt(entry, 'llama3') == ('<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n'
                                              'Name a color.\n\nsky<|eot_id|><|start_header_id|>assistant'
                                              '<|end_header_id|>\n\n')
    assert format_prompt(entry, 'chatml') == '<|im_start|>user\nName a color.\n\nsky<|im_end|>\n<|im_start|>assistant\n'
    for style in tokenizer.PROMPT_STYLES:  # one user message: what training used
        one = {'instruction': 'Name a color.', 'input': ''}
        assert format_chat([{'role': 'user', 'content': 'Name a color.'}], style) == format_prompt(one, style)
    talk = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
            {'role': 'assistant', 'content': 'Hello!'}, {'role': 'user', 'content': 'Color?'}]
    assert format_chat(talk, 'chatml') == (
        '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
        '<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nColor?<|im_end|>\n'
        '<|im_start|>assistant\n')
    assert format_chat(talk, 'llama3') == (
        '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>'
        '<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'
        'Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nColor?<|eot_id|>'
        '<|start_header_id|>assistant<|end_header_id|>\n\n')
    assert format_chat(talk, 'alpaca') == ('Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!'
                                           '\n\n### Instruction:\nColor?\n\n### Response:\n')
    assert format_chat(talk, 'phi3') == ('<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>:\nHello!\n'
                                         '<|user|>\nColor?\n<|assistant|>:\n')
    assert format_chat(talk, 'gemma') == (  # Gemma 3's template: the system message opens the first user turn
        '<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n'
        '<start_of_turn>user\nColor?<end_of_turn>\n<start_of_turn>model\n')
    assert format_prompt(entry, 'gemma') == '<bos><start_of_turn>user\nName a color.\n\nsky<end_of_turn>\n<start_of_turn>model\n'
    with pytest.raises(ValueError, match='chat message 1'):
        format_chat([{'role': 'user', 'content': 'x'}, {'role': 'bot', 'content': 'y'}], 'chatml')
    with pytest.raises(ValueError, match='unknown prompt style'):
        format_chat(talk, 'mistral')


def test_response_ends_are_single_special_tokens():
    llama3, qwen2 = get_tokenizer(TOKENIZERS / 'llama3'), get_tokenizer(TOKENIZERS / 'qwen2')
    assert response_end_id(llama3, 'llama3') == llama3.encode('<|eot_id|>')[0] == llama3.eot_id + 8
    assert response_end_id(qwen2, 'chatml') == qwen2.encode('<|im_end|>')[0]
    assert response_end_id(qwen2, 'alpaca') == qwen2.eot_id
    entry = {'instruction': 'Name a color.', 'input': '', 'output': 'Blue.'}
    ids = llama3.encode(format_prompt(entry, 'llama3') + entry['output'] + tokenizer.RESPONSE_END['llama3'])
    assert ids[0] == llama3.encode('<|begin_of_text|>')[0] and ids[-1] == response_end_id(llama3, 'llama3')
    assert sum(i in llama3.special_ids for i in ids) == 7
    with pytest.raises(ValueError, match='has no token for'):
        response_end_id(get_tokenizer('bytes'), 'chatml')
    assert response_end_id(get_tokenizer('bytes'), 'phi3') == 256
    gemma = get_tokenizer(GEMMA)
    assert response_end_id(gemma, 'gemma') == 6 and response_end_id(gemma, 'alpaca') == gemma.eot_id == 1
    with pytest.raises(ValueError, match="use Gemma 3's tokenizer"):
        response_end_id(qwen2, 'gemma')


# -------------------------------------------------------------------- against the libraries themselves

def random_texts(seed, n=300):
    pool = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789 '\".,;:!?-_()[]{}<>|/\\@#$%^&*+=~`") + [' '] * 12
            + ['\n', '\r\n', '\t', '  ', '\n\n', '\u00a0', '\u2009', '\u3000'] + list('éñüßøåçÉÅ٣٤½²ⅫⅣ①')
            + ['e\u0301', 'a\u0308', '\u0338', '\u200d', '\ufeff'] + list('你好世界日本語한국어Россияمرحبا')
            + ['😀', '👍🏽', '🇺🇸', '❤️', '👨‍👩‍👧'] + ["'s", "'LL", "'Ve", " 1234567", " the", " and"]
            + ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|eot_id|>', '<|begin_of_text|>'])
    rng = random.Random(seed)
    return [''.join(rng.choice(pool) for _ in range(rng.randint(0, 60))) for _ in range(n)]


@pytest.mark.parametrize('family', FAMILIES)
def test_random_texts_equal_the_tokenizers_library(family):
    tokenizers = pytest.importorskip('tokenizers')
    hf = tokenizers.Tokenizer.from_file(str(TOKENIZERS / family / 'tokenizer.json'))
    tok = get_tokenizer(TOKENIZERS / family)
    for text in random_texts(seed=len(family)) + [pydoc_text()[:100_000]]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids, text


def test_converted_tokenizer_model_equals_the_tokenizers_library(tmp_path):
    tokenizers = pytest.importorskip('tokenizers')
    tok = get_tokenizer(TOKENIZERS / 'llama3' / 'original' / 'tokenizer.model')
    (tmp_path / 'tokenizer.json').write_text(tok.spec['json'], encoding='utf-8')
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / 'tokenizer.json'))
    for text in random_texts(seed=3) + EXPECTED['texts'] + [pydoc_text()[:100_000]]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
    assert hf.token_to_id('<|eot_id|>') == tok.encode('<|eot_id|>')[0] and len(LLAMA3_SPECIAL_TOKENS) == 256


def test_our_bpe_loads_in_tokenizers_and_transformers_to_the_same_ids(tmp_path):
    tokenizers = pytest.importorskip('tokenizers')
    out = prepare('pydoc', tokenizer='bpe', vocab_size=1024, data_dir=tmp_path / 'd', quiet=True)
    tok = data_tokenizer(out)
    hf = tokenizers.Tokenizer.from_file(str(out / 'tokenizer.json'))
    val = np.asarray(read_shard(find_shards(out, 'val')[0])).tolist()
    text = tok.decode(val).replace(EOT, '\n')
    for sample in [text] + random_texts(seed=7):
        assert tok.encode(sample) == hf.encode(sample, add_special_tokens=False).ids
    transformers = pytest.importorskip('transformers')
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    assert auto(text, add_special_tokens=False)['input_ids'] == tok.encode(text)
    assert auto.convert_tokens_to_ids(EOT) == tok.eot_id == 1023


def test_our_bpe_compresses_within_two_percent_of_the_tokenizers_trainer():
    tokenizers = pytest.importorskip('tokenizers')
    from tokenizers import Regex, pre_tokenizers, trainers
    text = pydoc_text()
    cut = text.rfind('\n', 0, int(0.9 * len(text))) + 1
    ours = get_tokenizer({'name': 'ours', 'json': train_bpe([text[:cut]], 4096, quiet=True)})
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.GPT4_PATTERN), behavior='isolated', invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.train_from_iterator([text[:cut]], trainers.BpeTrainer(
        vocab_size=4096, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    held_out = text[cut:]
    ours_bytes_per_token = len(held_out.encode()) / len(ours.encode(held_out))
    hf_bytes_per_token = len(held_out.encode()) / len(hf.encode(held_out).ids)
    assert ours_bytes_per_token > 0.98 * hf_bytes_per_token, (ours_bytes_per_token, hf_bytes_per_token)
