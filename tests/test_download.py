"""download() and from_pretrained('gpt2') against a local http.server (no internet needed)."""
import hashlib

import pytest
import torch

import weights
from conftest import FIXTURES
from weights import download, from_pretrained

BODY = bytes(range(256)) * 4000  # ~1 MB


def test_download_streams_checks_and_renames(server, tmp_path):
    server.routes['/f.bin'] = BODY
    out = download(f"{server.url}/f.bin", tmp_path / 'f.bin', sha256=hashlib.sha256(BODY).hexdigest(), backoff=0)
    assert out.read_bytes() == BODY and not (tmp_path / 'f.bin.part').exists()
    server.requests.clear()
    download(f"{server.url}/f.bin", tmp_path / 'f.bin')  # cached: no request at all
    assert server.requests == []


def test_interrupted_download_resumes_with_range(server, tmp_path):
    server.routes['/f.bin'] = BODY
    server.truncate_once.add('/f.bin')
    download(f"{server.url}/f.bin", tmp_path / 'f.bin', backoff=0)
    assert (tmp_path / 'f.bin').read_bytes() == BODY
    resumed_at = int(server.requests[1][1].removeprefix('bytes=').rstrip('-'))
    assert 0 < resumed_at <= len(BODY) // 2  # the second request asked only for the rest


def test_interrupted_download_without_range_support_starts_over(server, tmp_path):
    server.routes['/f.bin'] = BODY
    server.truncate_once.add('/f.bin')
    server.no_range.add('/f.bin')
    download(f"{server.url}/f.bin", tmp_path / 'f.bin', backoff=0)
    assert (tmp_path / 'f.bin').read_bytes() == BODY


def test_server_error_is_retried(server, tmp_path):
    server.routes['/f.bin'] = BODY
    server.fail_once.add('/f.bin')
    download(f"{server.url}/f.bin", tmp_path / 'f.bin', backoff=0)
    assert (tmp_path / 'f.bin').read_bytes() == BODY and len(server.requests) == 2


def test_failures_leave_no_file_that_looks_complete(server, tmp_path):
    with pytest.raises(OSError, match='HTTP 404'):
        download(f"{server.url}/missing", tmp_path / 'm.bin', backoff=0)
    assert not (tmp_path / 'm.bin').exists()
    server.routes['/f.bin'] = BODY
    with pytest.raises(OSError, match='sha256'):
        download(f"{server.url}/f.bin", tmp_path / 'f.bin', sha256='0' * 64, backoff=0)
    assert not (tmp_path / 'f.bin').exists() and not (tmp_path / 'f.bin.part').exists()
    server.truncate_always.add('/f.bin')
    server.no_range.add('/f.bin')
    with pytest.raises(OSError, match='failed after 2 tries'):  # every attempt cut short
        download(f"{server.url}/f.bin", tmp_path / 'f.bin', retries=2, backoff=0)
    assert not (tmp_path / 'f.bin').exists()


def test_unreachable_server_gives_one_clear_error(tmp_path):
    with pytest.raises(OSError, match='check your connection'):
        download("http://127.0.0.1:9/x", tmp_path / 'x', retries=1, timeout=2)


def test_from_pretrained_downloads_gpt2_once_then_works_offline(server, tmp_path, monkeypatch):
    for name in ('config.json', 'model.safetensors'):
        server.routes[f'/openai-community/gpt2/resolve/main/{name}'] = (FIXTURES / 'tiny-gpt2' / name).read_bytes()
    server.truncate_once.add('/openai-community/gpt2/resolve/main/model.safetensors')
    monkeypatch.setattr(weights, 'HF_ENDPOINT', server.url)
    monkeypatch.setattr(weights, 'CACHE_DIR', tmp_path / 'cache')
    model = from_pretrained('gpt2')
    ref = from_pretrained(FIXTURES / 'tiny-gpt2')
    ids = torch.randint(0, 96, (1, 6))
    assert torch.equal(model(ids)[0], ref(ids)[0])
    assert sorted(p.name for p in (tmp_path / 'cache' / 'gpt2').iterdir()) == ['config.json', 'model.safetensors']
    server.close()  # offline from now on
    assert torch.equal(from_pretrained('gpt2')(ids)[0], ref(ids)[0])


@pytest.mark.parametrize('family', ['tiny-gpt2', 'tiny-qwen3'])  # the whole-file reader and the on-demand one
def test_a_safetensors_header_claiming_too_many_bytes_is_refused_unread(tmp_path, family):
    import shutil
    import tracemalloc
    folder = tmp_path / family
    shutil.copytree(FIXTURES / family, folder)
    for claim in (weights.SAFETENSORS_MAX_HEADER + 1, 2**64 - 1):
        (folder / 'model.safetensors').write_bytes(claim.to_bytes(8, 'little') + b'{"a": 1}')
        tracemalloc.start()
        with pytest.raises(ValueError) as e:
            from_pretrained(folder)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert f"model.safetensors is not a valid safetensors file (its header claims {claim:,} bytes" in str(e.value)
        assert '\n' not in str(e.value) and peak < 2**20, peak  # nothing the size of the claim was allocated
