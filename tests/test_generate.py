"""generate(): prompts of different lengths in one batch (left padding), and the compiled one-token step
(a static KV cache: every step one fixed graph) against eager decoding."""
import pytest
import torch

from configurator import compile_available, compile_decoding
from conftest import spread_weights
from model import GPT, GPTConfig, KVCache

LLAMA_STYLE = dict(norm='rmsnorm', pos_emb='rope', mlp='swiglu', n_kv_head=2, bias=False)


def tiny(**family):
    """A random model whose weights are spread wide, so that its next token depends on the whole context
    (GPT-2's small init repeats one token whatever it reads, and would hide a wrong mask)."""
    torch.manual_seed(0)
    return spread_weights(GPT(GPTConfig(block_size=48, vocab_size=96, n_layer=2, n_head=4, n_embd=32, **family)).eval())


def left_padded(prompts, pad_id=0):
    """(B, T) ids with each prompt at the right end of its row, and the (B,) padding counts."""
    T = max(len(p) for p in prompts)
    rows = [torch.cat((torch.full((T - len(p),), pad_id), p)) for p in prompts]
    return torch.stack(rows), torch.tensor([T - len(p) for p in prompts])


@pytest.mark.parametrize('family', [{}, LLAMA_STYLE], ids=['gpt2', 'llama'])
def test_padded_batch_equals_one_prompt_at_a_time(family):
    model = tiny(**family)
    torch.manual_seed(1)
    prompts = [torch.randint(1, 96, (n,)) for n in (3, 11, 6, 1)]
    batch, padding = left_padded(prompts, pad_id=7)
    out = model.generate(batch, 20, temperature=0, padding=padding)
    for row, prompt in zip(out, prompts):
        alone = model.generate(prompt[None], 20, temperature=0)[0, len(prompt):]
        assert torch.equal(row[batch.size(1):], alone)
    # the padding is never attended to: another pad id changes nothing
    assert torch.equal(model.generate(left_padded(prompts, pad_id=55)[0], 20, temperature=0, padding=padding)[:, -20:],
                       out[:, -20:])
    # past the context (block_size 48) the window slides, for the whole batch at once: each row then reads its own
    # last tokens, as computed without a cache; the row without padding slides as its prompt alone does
    T = batch.size(1)
    long = model.generate(batch, 60, temperature=0, padding=padding)
    assert torch.equal(long[:, :T + 20], out)
    assert torch.equal(long[:, T:], sliding_window_reference(model, prompts, T, 60))
    assert torch.equal(long[1, T:], model.generate(prompts[1][None], 60, temperature=0)[0, T:])


def test_padding_changes_the_answer_without_the_mask():
    """The test above can fail: feeding the pads as if they were text gives other tokens."""
    model = tiny()
    torch.manual_seed(1)
    prompts = [torch.randint(1, 96, (n,)) for n in (3, 11)]
    batch, padding = left_padded(prompts, pad_id=7)
    alone = model.generate(prompts[0][None], 12, temperature=0)[0, 3:]
    assert not torch.equal(model.generate(batch, 12, temperature=0)[0, -12:], alone)
    assert torch.equal(model.generate(batch, 12, temperature=0, padding=padding)[0, -12:], alone)


@pytest.mark.skipif(not compile_available('cpu'), reason="torch.compile needs a C compiler here")
def test_compiled_step_equals_eager_and_compiles_once():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny(**LLAMA_STYLE)
    idx = torch.randint(0, 96, (2, 5))
    eager = model.generate(idx, 24, temperature=0)
    step = torch.compile(model.decode_step, fullgraph=True, dynamic=False)
    cache = model.new_kv_cache(2, 29, idx.device)
    compiled = model.generate(idx, 24, temperature=0, kv_cache=cache, decode_step=step)
    assert torch.equal(compiled, eager)
    # every one of the 23 one-token steps ran the same graph: nothing recompiled per token
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] == 1
    cache.restart(0)  # a second generation on the same cache reuses it too
    assert torch.equal(model.generate(idx, 24, temperature=0, kv_cache=cache, decode_step=step), eager)
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] == 1


def sliding_window_reference(model, prompts, T, n):
    """The n greedy tokens after the left-padded prompts (padded to T), computed without a cache: when the text
    outgrows the window, the window restarts from its last half (a prompt longer than the window: from its last
    window tokens), and each row reads its own tokens in the window (never padding) from position 0."""
    window, rows, offset = model.config.block_size, [p.tolist() for p in prompts], 0
    pads = [T - len(p) for p in prompts]
    for length in range(T, T + n):
        if length - offset > window:
            offset = length - (window if length == T else window // 2)
        for row, pad in zip(rows, pads):
            start = max(offset - pad, 0)  # where the window starts among the row's own tokens
            row.append(int(model(torch.tensor([row[start:]]))[0][0, -1].argmax()))
    return torch.tensor([row[-n:] for row in rows])


def past_the_window():
    """A left-padded Llama batch to decode 60 tokens past its 48-token window: the cache slides three times, the
    first time with padding still in it. (model, prompts, the padded length T, plain generate()'s tokens, and
    static(decode_step): the tokens decoded through a static cache with that one-token step)."""
    model = tiny(**LLAMA_STYLE)
    torch.manual_seed(2)
    prompts = [torch.randint(1, 96, (n,)) for n in (40, 30, 3, 17)]
    batch, padding = left_padded(prompts, pad_id=7)
    n = model.config.block_size + 60 - batch.size(1)
    plain = model.generate(batch, n, temperature=0, padding=padding)

    def static(step):
        cache = KVCache(model.config, len(prompts), 'cpu', torch.float32, model.config.block_size, padding)
        return model.generate(batch, n, temperature=0, kv_cache=cache, padding=padding, decode_step=step)
    return model, prompts, batch.size(1), plain, static


def test_static_cache_past_its_window_eager():
    """plain generate() is the uncached reference's tokens, and so is the one-token step (eager) on a static cache."""
    model, prompts, T, plain, static = past_the_window()
    assert len(set(plain[:, T:].flatten().tolist())) > 20  # the model's next token depends on what it reads
    assert torch.equal(plain[:, T:], sliding_window_reference(model, prompts, T, plain.size(1) - T))
    assert torch.equal(static(model.decode_step), plain)


@pytest.mark.skipif(not compile_available('cpu'), reason="torch.compile needs a C compiler here")
def test_static_cache_past_its_window_compiled():
    """The compiled step gives the eager tokens above, one graph for every token and every slide."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, _, _, plain, static = past_the_window()
    assert torch.equal(static(compile_decoding(model, True, 'cpu')), plain)
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] == 1


def test_chapter7_responses_in_batches_equal_one_at_a_time():
    """finetune_instruct.py's test-set responses, generated gen_batch_size at a time, are the texts the
    model gives each prompt alone (float32, greedy, prompts of several lengths). The wide random model
    answers each prompt differently; a few training steps on the book's data only teach it one answer."""
    import json
    from contextlib import nullcontext
    import finetune_instruct as fi
    from conftest import SHARED
    from tokenizer import ByteTokenizer, format_prompt
    path = SHARED / 'data' / 'instruction-data.json'
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    test = json.loads(path.read_text(encoding='utf-8'))[:6]
    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = spread_weights(GPT(GPTConfig(block_size=512, vocab_size=257, n_layer=2, n_head=2, n_embd=48)).eval())
    assert len({len(tok.encode(format_prompt(e))) for e in test}) >= 4  # several prompt lengths
    alone = [fi.respond(model, e, tok, 'alpaca', 'cpu', nullcontext(), 24) for e in test]
    batched = fi.respond_batch(model, test, tok, 'alpaca', 'cpu', nullcontext(), 24)
    assert batched == alone and len(set(alone)) > 3


@pytest.mark.parametrize('n_kv_head', [4, 2], ids=['mha', 'gqa'])
def test_one_query_attention_equals_sdpa(n_kv_head):
    # decoding on a CPU in bfloat16 past 64 keys attends with plain matmuls (model.one_query_attention), not SDPA
    import torch.nn.functional as F
    from model import one_query_attention
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, n_kv_head, 100, 16)
    v = torch.randn_like(k)
    mask = torch.rand(2, 1, 1, 100) > 0.3  # (B, 1, 1, S): padding, or the static cache's empty slots
    for m in (None, mask):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=n_kv_head != 4)
        assert (one_query_attention(q, k, v, m) - expected).abs().max() < 1e-5
        got = one_query_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), m).float()
        assert (got - expected).abs().max() < 0.02  # bfloat16's rounding


@pytest.mark.parametrize('family', [{}, LLAMA_STYLE], ids=['gpt2', 'llama'])
def test_bfloat16_decoding_past_64_keys_attends_in_matmuls(family, monkeypatch):
    import model as model_file
    original, keys = model_file.one_query_attention, []

    def counted(q, k, v, mask=None, scale=None):
        keys.append(k.size(2))
        return original(q, k, v, mask, scale)
    monkeypatch.setattr(model_file, 'one_query_attention', counted)
    torch.manual_seed(0)
    model = spread_weights(GPT(GPTConfig(block_size=128, vocab_size=96, n_layer=2, n_head=4, n_embd=32, **family)))
    model = model.eval().to(torch.bfloat16)
    text = model.generate(torch.randint(1, 96, (1, 60)), 20, temperature=0)
    assert max(keys) == 79 and min(keys) == 65  # every one-token step past 64 keys, and only those
    cache = model.new_kv_cache(1, 128, torch.device('cpu'))
    with torch.no_grad():
        for t in range(60, 80):  # each cached step's logits against the whole text's, through SDPA
            cached, full = model.next_logits(text[:, :t], cache).float(), model(text[:, :t])[0][:, -1].float()
            assert (cached - full).abs().max() <= 0.05 * full.std(), t


@pytest.mark.parametrize('onednn', [False, True], ids=['aten', 'onednn'])
def test_one_token_steps_run_the_measured_matmul_kernel(onednn, monkeypatch):
    """Decoding on a CPU in bf16: the one-token steps' matmuls run with the kernel one_row_kernels chose (oneDNN off
    where ATen's own one-row kernel is faster), attention's small matmuls with oneDNN, the prompt as before, and the
    setting is back after; greedy tokens are the same either way."""
    import model as model_file
    monkeypatch.setitem(model_file.ONEDNN_AT_ONE_ROW, torch.bfloat16, onednn)
    seen = []  # (tokens in, oneDNN on) at each MLP matmul, and ('attention', oneDNN on) at one_query_attention's
    matmul = torch.Tensor.__matmul__

    def attention_matmul(a, b):
        seen.append(('attention', torch.backends.mkldnn.enabled))
        return matmul(a, b)
    monkeypatch.setattr(torch.Tensor, '__matmul__', attention_matmul)
    torch.manual_seed(0)
    model = spread_weights(GPT(GPTConfig(block_size=128, vocab_size=96, n_layer=2, n_head=4, n_embd=32))).eval()
    model = model.to(torch.bfloat16)
    model.transformer.h[0].mlp.c_fc.register_forward_pre_hook(
        lambda m, args: seen.append((args[0].size(1), torch.backends.mkldnn.enabled)))
    out = model.generate(torch.randint(1, 96, (1, 70)), 4, temperature=0)
    assert seen[0] == (70, True) and set(seen[1:]) == {(1, onednn), ('attention', True)}, seen
    assert torch.backends.mkldnn.enabled
    monkeypatch.setitem(model_file.ONEDNN_AT_ONE_ROW, torch.bfloat16, not onednn)
    assert torch.equal(model.generate(out[:, :70], 4, temperature=0), out)


def test_onednn_turned_off_by_the_user_stays_off_in_decoding(monkeypatch):
    # one_row_kernels measures nothing then, and attention's small matmuls keep the user's setting (they turn oneDNN
    # back on only where one_row_kernels turned it off)
    import model as model_file
    monkeypatch.setattr(model_file, 'ONEDNN_AT_ONE_ROW', {})
    seen, matmul = [], torch.Tensor.__matmul__  # oneDNN's setting at each of attention's matmuls
    monkeypatch.setattr(torch.Tensor, '__matmul__', lambda a, b: seen.append(torch.backends.mkldnn.enabled)
                        or matmul(a, b))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=96, n_layer=2, n_head=4, n_embd=32)).eval().to(torch.bfloat16)
    with model_file.onednn_enabled(False):
        model.generate(torch.randint(1, 96, (1, 70)), 3, temperature=0)
        assert seen and not any(seen) and not torch.backends.mkldnn.enabled
    assert model_file.ONEDNN_AT_ONE_ROW == {} and torch.backends.mkldnn.enabled and model_file.ONEDNN_OUTSIDE_STEP == []


def test_one_row_kernels_are_chosen_by_a_measurement_once(monkeypatch):
    # a fake clock: each oneDNN matmul takes `onednn` seconds, each of ATen's `aten`; ATen must be 10% faster to win
    import model as model_file
    for onednn, aten, chosen in [(10.0, 5.0, False), (10.0, 9.5, True)]:
        ticks = iter([0.0, onednn, 0.0, aten] * 3)
        monkeypatch.setattr(model_file.time, 'perf_counter', lambda: next(ticks))
        monkeypatch.setattr(model_file, 'ONEDNN_AT_ONE_ROW', {})
        with model_file.one_row_kernels(torch.bfloat16, torch.device('cpu')):
            assert torch.backends.mkldnn.enabled == chosen
        with model_file.one_row_kernels(torch.bfloat16, torch.device('cpu')):  # measured once: no clock left
            assert torch.backends.mkldnn.enabled == chosen
        with model_file.one_row_kernels(torch.float32, torch.device('cpu')):  # float32: nothing measured or changed
            assert torch.backends.mkldnn.enabled
        assert model_file.ONEDNN_AT_ONE_ROW == {torch.bfloat16: chosen} and torch.backends.mkldnn.enabled


@pytest.mark.skipif(not compile_available('cpu'), reason="torch.compile needs a C compiler here")
def test_compiled_bf16_step_past_64_keys_is_within_tolerance_of_eager():
    # compiled, one_query_attention is sums that Inductor fuses (no matmul kernel); eager, oneDNN's matmuls
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = spread_weights(GPT(GPTConfig(block_size=128, vocab_size=96, n_layer=2, n_head=4, n_embd=32,
                                         **LLAMA_STYLE))).eval().to(torch.bfloat16)
    text, step = torch.randint(1, 96, (2, 90)), compile_decoding(model, True, 'cpu')
    logits = []
    with torch.no_grad():
        for decode_step in (None, step):
            cache = model.new_kv_cache(2, 96, text.device)
            model.next_logits(text[:, :80], cache)
            logits.append(torch.stack([model.next_logits(text[:, :t], cache, decode_step) for t in range(81, 91)]))
    eager, compiled = (x.float() for x in logits)
    assert (compiled - eager).abs().max() <= 0.02 * (eager.max() - eager.min())
