"""prepare_data.py: tokenizers, the llm.c shard format, data sets, downloads, bad input."""
import json

import numpy as np
import pytest

import prepare_data
from conftest import SHARED, assert_one_line_error, needs_gpt2_bpe, run_here, run_script
from prepare_data import find_shards, prepare, read_meta, read_shard, split_pieces, write_shard
from tokenizer import ByteTokenizer, get_tokenizer


def test_shard_round_trip_and_header(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 1000).astype(np.uint16)
    write_shard(tmp_path / 'x_train_000000.bin', tokens)
    raw = (tmp_path / 'x_train_000000.bin').read_bytes()
    header = np.frombuffer(raw[:1024], dtype=np.int32)
    assert list(header[:3]) == [20240520, 1, 1000] and not header[3:].any()
    assert len(raw) == 1024 + 2 * 1000
    assert np.array_equal(read_shard(tmp_path / 'x_train_000000.bin'), tokens)


def test_corrupt_shards_are_named(tmp_path):
    write_shard(tmp_path / 'a.bin', np.arange(100, dtype=np.uint16))
    data = (tmp_path / 'a.bin').read_bytes()
    (tmp_path / 'b.bin').write_bytes(data[:-10])
    with pytest.raises(ValueError, match='b.bin is corrupt'):
        read_shard(tmp_path / 'b.bin')
    (tmp_path / 'c.bin').write_bytes(b'\x00' * 2000)
    with pytest.raises(ValueError, match='c.bin is not a token shard'):
        read_shard(tmp_path / 'c.bin')
    (tmp_path / 'd.bin').write_bytes(b'abc')
    with pytest.raises(ValueError, match='d.bin is not a token shard'):
        read_shard(tmp_path / 'd.bin')


def test_byte_tokenizer():
    tok = ByteTokenizer()
    text = 'héllo<|endoftext|>wörld'
    ids = tok.encode(text)
    assert ids[:3] == [104, 195, 169] and ids.count(256) == 1 and max(ids) == 256
    assert tok.decode(ids) == text


@needs_gpt2_bpe
def test_gpt2_tokenizer_matches_the_book():
    tok = get_tokenizer('gpt2')
    # ch02: "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    ids = tok.encode("Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace.")
    assert ids[:6] == [15496, 11, 466, 345, 588, 8887] and 50256 in ids
    assert tok.decode(ids).endswith('someunknownPlace.')
    with pytest.raises(ValueError, match='unknown tokenizer'):
        get_tokenizer('sentencepiece')


def test_split_pieces_cut_only_before_a_new_line_that_starts_with_text():
    text = ''.join(f"line {i}\n\n   indented {i}\n" for i in range(500))
    pieces = split_pieces(text, size=200)
    assert ''.join(pieces) == text and len(pieces) > 10
    for p in pieces[:-1]:
        assert p.endswith('\n')
    for p in pieces[1:]:
        assert not p[0].isspace()


def test_pydoc_default_needs_no_download(pydoc_data, monkeypatch):
    from pydoc_data.topics import topics
    out = pydoc_data  # prepare('pydoc', data_dir=..., quiet=True), once a session (conftest)
    meta = read_meta(out)
    assert meta['tokenizer'] == 'bytes' and meta['vocab_size'] == 257
    train, val = read_shard(find_shards(out, 'train')[0]), read_shard(find_shards(out, 'val')[0])
    topics_bytes = sum(len(t.encode('utf-8')) for t in topics.values())
    assert abs(len(val) - 0.1 * topics_bytes) < 2000  # the topics' last 10%, however much docstring text there is
    docstrings = prepare_data.stdlib_docstrings()
    assert len(docstrings) > 300 and sum(size for _, size, _ in docstrings) > 1_000_000
    # + one end-of-text token per document
    expected_train = 0.9 * topics_bytes + sum(size for _, size, _ in docstrings) + len(topics) + len(docstrings)
    assert abs(len(train) - expected_train) < 2000
    tok = ByteTokenizer()
    train_text, val_text = tok.decode(np.asarray(train).tolist()), tok.decode(np.asarray(val).tolist())
    assert 'Return' in train_text[:200_000] and 'statement' in train_text[-400_000:]  # docstrings first, then topics
    assert val_text.endswith(topics[sorted(topics)[-1]] + '<|endoftext|>')
    assert not any(d[:200] in val_text for _, _, d in docstrings if len(d) > 200)
    monkeypatch.setattr(prepare_data, 'stdlib_docstrings', None)  # a re-run with nothing to do parses nothing
    assert prepare('pydoc', data_dir=out, quiet=True) == out


def test_stdlib_docstrings_take_modules_classes_and_functions_but_no_tests(tmp_path, monkeypatch):
    import sysconfig
    (tmp_path / 'test').mkdir()
    (tmp_path / 'pkg').mkdir()
    (tmp_path / 'pkg' / 'mod.py').write_text('"""Module doc."""\nclass A:\n    """Class doc."""\n'
                                             '    def f(self):\n        """Method doc."""\nx = 1\n')
    (tmp_path / 'test' / 'test_mod.py').write_text('"""A test, left out."""\n')
    (tmp_path / 'py2only.py').write_text('"""Old."""\nprint "no"\n')  # not valid Python 3: skipped
    (tmp_path / 'nodoc.py').write_text('x = 1\n')
    monkeypatch.setattr(sysconfig, 'get_paths', lambda: {'stdlib': str(tmp_path)})
    prepare_data.stdlib_docstrings.cache_clear()
    try:
        docs = prepare_data.stdlib_docstrings()
    finally:
        prepare_data.stdlib_docstrings.cache_clear()
    text = 'Module doc.\n\nClass doc.\n\nMethod doc.'
    assert docs == (('stdlib:pkg/mod.py', len(text), text),)


def test_train_only_documents_leave_the_validation_split_as_it_was():
    docs = [('a', 400, 'a\n' * 200), ('b', 400, 'b\n' * 200)]
    extra = [('x', 1000, 'x\n' * 500)]
    alone = list(prepare_data.iter_pieces(docs, 0.25))
    both = list(prepare_data.iter_pieces(extra + docs, 0.25, train_only=1))
    val = [(t, ends) for t, split, ends in alone if split == 'val']
    assert val == [(t, ends) for t, split, ends in both if split == 'val'] and ''.join(t for t, _ in val) == 'b\n' * 100
    assert [t for t, split, _ in both if split == 'train'] == ['x\n' * 500] + [t for t, s, _ in alone if s == 'train']


def test_folder_input_documents_split_and_rerun_skips(tmp_path, capsys):
    src = tmp_path / 'texts'
    (src / 'sub').mkdir(parents=True)
    (src / 'a.txt').write_text('alpha ' * 200, encoding='utf-8')
    (src / 'sub' / 'b.txt').write_text('beta ' * 200, encoding='utf-8')
    (src / 'ignored.md').write_text('not text', encoding='utf-8')
    out = prepare(input=str(src), data_dir=tmp_path / 'd', val_fraction=0.25, quiet=True)
    train = np.asarray(read_shard(find_shards(out, 'train')[0])).tolist()
    val = np.asarray(read_shard(find_shards(out, 'val')[0])).tolist()
    tok = ByteTokenizer()
    assert tok.decode(train + val) == 'alpha ' * 200 + '<|endoftext|>' + 'beta ' * 200 + '<|endoftext|>'
    assert abs(len(val) - 0.25 * (len(train) + len(val))) < 10
    stamp = (out / 'meta.json').stat().st_mtime_ns
    prepare(input=str(src), data_dir=tmp_path / 'd', val_fraction=0.25)
    assert 'nothing to do' in capsys.readouterr().out and (out / 'meta.json').stat().st_mtime_ns == stamp
    (src / 'a.txt').write_text('gamma ' * 100, encoding='utf-8')
    prepare(input=str(src), data_dir=tmp_path / 'd', val_fraction=0.25, quiet=True)
    assert json.loads((out / 'meta.json').read_text())['train_tokens'] < len(train)


def test_parallel_tokenization_equals_serial(tmp_path, monkeypatch):
    text = ''.join(f"Paragraph {i}: some words here, and more words.\n" for i in range(3000))
    (tmp_path / 'big.txt').write_text(text, encoding='utf-8')
    serial = prepare(input=str(tmp_path / 'big.txt'), data_dir=tmp_path / 's', num_workers=1, quiet=True)
    monkeypatch.setattr(prepare_data, 'PIECE_CHARS', 10_000)  # > 4 pieces: the pool is used
    parallel = prepare(input=str(tmp_path / 'big.txt'), data_dir=tmp_path / 'p', num_workers=2, quiet=True)
    for split in ('train', 'val'):
        assert np.array_equal(read_shard(find_shards(serial, split)[0]), read_shard(find_shards(parallel, split)[0]))


def test_shards_are_cut_at_the_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, 'SHARD_TOKENS', 1000)
    (tmp_path / 't.txt').write_text('x' * 4500, encoding='utf-8')
    out = prepare(input=str(tmp_path / 't.txt'), data_dir=tmp_path / 'd', val_fraction=0.0, quiet=True)
    sizes = [len(read_shard(p)) for p in find_shards(out, 'train')]
    assert sizes == [1000, 1000, 1000, 1000, 501]


def test_verdict_download_against_local_server(server, tmp_path, monkeypatch):
    body = (SHARED / 'data' / 'the-verdict.txt').read_bytes() if (SHARED / 'data' / 'the-verdict.txt').exists() \
        else b'I HAD always thought Jack Gisburn rather a cheap genius.\n' * 50
    url, name, sha = prepare_data.DATASETS['verdict']
    import hashlib
    monkeypatch.setitem(prepare_data.DATASETS, 'verdict', (f"{server.url}/the-verdict.txt", name,
                                                           hashlib.sha256(body).hexdigest()))
    server.routes['/the-verdict.txt'] = body
    server.truncate_once.add('/the-verdict.txt')
    out = prepare('verdict', data_dir=tmp_path / 'v', quiet=True)
    assert (out / 'the-verdict.txt').read_bytes() == body
    tok = ByteTokenizer()
    train = np.asarray(read_shard(find_shards(out, 'train')[0])).tolist()
    assert tok.decode(train).startswith(body[:40].decode())


def test_fineweb_shards_download_as_they_are(server, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, 'FINEWEB_URL', server.url + '/fw/')
    for name in ('fineweb_val_000000.bin', 'fineweb_train_000001.bin', 'fineweb_train_000002.bin'):
        write_shard(tmp_path / name, np.arange(5000, dtype=np.uint16))
        server.routes['/fw/' + name] = (tmp_path / name).read_bytes()
    out = prepare_data.prepare_fineweb(tmp_path / 'fw', 2)
    assert [p.name for p in find_shards(out, 'train')] == ['fineweb_train_000001.bin', 'fineweb_train_000002.bin']
    assert read_meta(out)['tokenizer'] == 'gpt2' and len(read_shard(find_shards(out, 'val')[0])) == 5000


def test_bad_inputs_give_one_line_errors(tmp_path):
    # in a new interpreter, as a user runs it: no traceback reaches the user; the other error lines in this process
    out = f'--data_dir={tmp_path}/o'
    assert_one_line_error(run_script('prepare_data.py', f'--input={tmp_path}/missing.txt', out), 'missing.txt')
    (tmp_path / 'bad.txt').write_bytes(b'ok \xff\xfe bad')
    assert_one_line_error(run_here('prepare_data.py', f'--input={tmp_path}/bad.txt', out), 'not valid UTF-8')
    (tmp_path / 'empty.txt').write_text('')
    assert_one_line_error(run_here('prepare_data.py', f'--input={tmp_path}/empty.txt', out), 'empty')
    (tmp_path / 'emptydir').mkdir()
    assert_one_line_error(run_here('prepare_data.py', f'--input={tmp_path}/emptydir', out), 'no .txt files')
    assert_one_line_error(run_here('prepare_data.py', '--dataset=wikipedia', out), 'unknown dataset')
    assert_one_line_error(run_here('prepare_data.py', '--tokenizer=sp', out), 'unknown tokenizer')
    assert not (tmp_path / 'o' / 'meta.json').exists()


def test_bad_fraction_and_shard_count_give_one_line_errors(tmp_path):
    (tmp_path / 'a.txt').write_text('some text to split\n' * 50, encoding='utf-8')
    for bad in ('1.0', '-0.1'):
        assert_one_line_error(run_here('prepare_data.py', f'--input={tmp_path}/a.txt', f'--data_dir={tmp_path}/o',
                                       f'--val_fraction={bad}'), f'--val_fraction={bad}', '[0, 1)')
    # checked before anything is downloaded (there is no server to reach here)
    assert_one_line_error(run_here('prepare_data.py', '--dataset=fineweb10B', f'--data_dir={tmp_path}/fw',
                                   '--num_shards=0'), '--num_shards=0', '1 to 103')
    with pytest.raises(ValueError, match='--num_shards=104: FineWeb10B has 1 to 103'):
        prepare_data.prepare_fineweb(tmp_path / 'fw', 104)
    assert not (tmp_path / 'o').exists() and not (tmp_path / 'fw').exists()
