"""finetune_instruct.py (chapter 7): prompt templates, collate masking, learning, responses, the judge client."""
import json

import pytest
import torch

import finetune_instruct as fi
from conftest import assert_one_line_error, run_here, run_script
from model import GPT, GPTConfig
from weights import load_checkpoint, save_checkpoint
from tokenizer import format_prompt

WORDS = 'apple river stone cloud tiger lemon paper music candle forest'.split()


def synthetic_entries(path, n=60):
    """Tiny instructions a small model can learn: repeat or reverse a word."""
    entries = []
    for i in range(n):
        w = WORDS[i % len(WORDS)] + WORDS[(i * 7) % len(WORDS)]
        if i % 2:
            entries.append({'instruction': 'Repeat the word.', 'input': w, 'output': w})
        else:
            entries.append({'instruction': 'Say yes.', 'input': '', 'output': 'yes'})
    path.write_text(json.dumps(entries), encoding='utf-8')
    return path


def base_checkpoint(folder, block_size=256):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=257, n_layer=2, n_head=2, n_embd=48))
    save_checkpoint(folder / 'ckpt.pt', model, 'bytes', {})
    return model


def greedy_response(out_dir, instruction, max_new_tokens):
    """(prompt, response) as sample.py --temperature=0 should print them for an instruction-tuned checkpoint:
    the instruction in the checkpoint's template, continued greedily (here without the KV cache) until the
    template's end of a response, which is not printed."""
    from tokenizer import get_tokenizer, response_end_id
    from weights import load_pretrained
    model, info = load_pretrained(str(out_dir))
    tok = get_tokenizer(info['tokenizer'])
    prompt = format_prompt({'instruction': instruction, 'input': ''}, info['prompt_style'])
    ids = tok.encode(prompt)
    end = response_end_id(tok, info['prompt_style'])
    out = model.eval().generate(torch.tensor([ids]), max_new_tokens, temperature=0, eos_id=end, use_cache=False)
    return prompt, tok.decode([t for t in out[0, len(ids):].tolist() if t != end])


def test_prompt_templates():
    entry = {'instruction': 'Name a color.', 'input': '', 'output': 'Blue.'}
    assert format_prompt(entry) == ('Below is an instruction that describes a task. Write a response that '
                                    'appropriately completes the request.\n\n### Instruction:\nName a color.'
                                    '\n\n### Response:\n')
    assert format_prompt({**entry, 'input': 'sky'}, 'phi3') == '<|user|>\nName a color.\nsky\n<|assistant|>:\n'
    assert '### Input:\nsky\n\n### Response:' in format_prompt({**entry, 'input': 'sky'})


def test_collate_masks_exactly_the_right_positions():
    batch = [([1, 2, 3], 2), ([4, 5, 6, 7, 8], 3)]
    x, y = fi.collate(batch, pad_id=0)
    assert x.tolist() == [[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]]
    assert y.tolist() == [[2, 3, 0, -100, -100], [5, 6, 7, 8, 0]]  # the first end-of-text stays a target
    x, y = fi.collate(batch, pad_id=0, mask_inputs=True)
    assert y.tolist() == [[-100, 3, 0, -100, -100], [-100, -100, 7, 8, 0]]  # prompt tokens are not targets
    x, y = fi.collate(batch, pad_id=0, allowed_max_length=3)
    assert x.shape == y.shape == (2, 3) and y.tolist() == [[2, 3, 0], [5, 6, 7]]


def test_score_parsing():
    texts = ('85', 'Score: 90.', '100', ' 0\n', 'I would give it 72 points')
    assert [fi.parse_score(t) for t in texts] == [85, 90, 100, 0, 72]
    assert [fi.parse_score(t) for t in ('excellent!', '3.5', '150', '')] == [None, None, None, None]


def fake_ollama(server, answer='8', chunks=('8', '5')):
    lines = [json.dumps({'message': {'role': 'assistant', 'content': c}, 'done': False}) for c in chunks]
    lines.append(json.dumps({'message': {'role': 'assistant', 'content': ''}, 'done': True}))
    server.post_routes['/api/chat'] = ('\n'.join(lines) + '\n').encode()


def test_judge_client_against_a_fake_ollama(server):
    fake_ollama(server, chunks=('8', '5'))  # the number arrives in two streamed chunks
    entry = {'instruction': 'Name a color.', 'input': '', 'output': 'Blue.', 'model_response': 'Red.'}
    assert fi.score_responses([entry], server.url, 'llama3') == [85]
    path, payload = server.posts[-1]
    assert payload['model'] == 'llama3' and payload['options']['seed'] == 123 and payload['options']['temperature'] == 0
    assert 'score the model response `Red.`' in payload['messages'][0]['content']
    fake_ollama(server, chunks=('I cannot rate', ' this.'))
    assert fi.score_responses([entry], server.url, 'llama3') == [None]
    url = server.url
    server.close()
    with pytest.raises(OSError, match='unreachable'):
        fi.score_responses([entry], url, 'llama3')


def fake_openai_server(seen, status=200, content='Score: 85'):
    """A /v1/chat/completions on 127.0.0.1 answering `content`, recording (path, Authorization, JSON) in seen."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            seen.append((self.path, self.headers.get('Authorization'),
                         json.loads(self.rfile.read(int(self.headers['Content-Length'])))))
            ok = self.path == '/v1/chat/completions' and status == 200
            body = json.dumps({'object': 'chat.completion', 'choices': [{'index': 0, 'finish_reason': 'stop',
                               'message': {'role': 'assistant', 'content': content}}]} if ok else
                              {'error': {'message': 'no', 'type': 'invalid_request_error'}}).encode()
            self.send_response(200 if ok else 404 if status == 200 else status)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def test_judge_client_against_a_fake_openai_compatible_server(tmp_path, monkeypatch):
    seen = []
    httpd, url = fake_openai_server(seen)
    entry = {'instruction': 'Name a color.', 'input': '', 'output': 'Blue.', 'model_response': 'Red.'}
    monkeypatch.setenv('OPENAI_API_KEY', 'sk-test')
    assert fi.score_responses([entry], f'{url}/v1', 'gpt-4o-mini', 'openai') == [85]
    path, auth, payload = seen[-1]
    assert path == '/v1/chat/completions' and auth == 'Bearer sk-test'
    assert payload['model'] == 'gpt-4o-mini' and payload['temperature'] == 0 and payload['seed'] == 123
    assert 'score the model response `Red.`' in payload['messages'][0]['content']
    monkeypatch.delenv('OPENAI_API_KEY')
    assert fi.score_responses([entry], f'{url}/v1/', 'm', 'openai') == [85] and seen[-1][1] is None  # no key: no header
    with pytest.raises(OSError, match='ending in /v1'):
        fi.score_responses([entry], url, 'm', 'openai')  # the server's root, not its API
    httpd.shutdown()
    httpd.server_close()
    with pytest.raises(OSError, match='unreachable.*OpenAI-compatible'):
        fi.score_responses([entry], f'{url}/v1', 'm', 'openai')
    refusing, refusing_url = fake_openai_server(seen, status=401)
    with pytest.raises(OSError, match='401.*OPENAI_API_KEY'):
        fi.score_responses([entry], f'{refusing_url}/v1', 'm', 'openai')
    refusing.shutdown()
    refusing.server_close()
    # the script: --judge=openai scores every response through the API, with the key
    base_checkpoint(tmp_path)
    judge, judge_url = fake_openai_server(seen, content='70')
    monkeypatch.setenv('OPENAI_API_KEY', 'sk-script')
    data = synthetic_entries(tmp_path / 'd.json')
    proc = run_script('finetune_instruct.py', f'--data={data}', f'--init_from={tmp_path}',
                      f'--out_dir={tmp_path / "out"}', '--max_iters=1', '--eval_iters=1', '--eval_limit=2',
                      '--max_new_tokens=2', '--judge=openai', f'--judge_url={judge_url}/v1', '--judge_model=local')
    judge.shutdown()
    judge.server_close()
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
    assert metrics['judge_score'] == 70 and metrics['judge_scored'] == 2 and metrics['judge_model'] == 'local'
    assert seen[-1][1] == 'Bearer sk-script' and seen[-1][2]['model'] == 'local'


def test_instruction_tuning_learns_saves_and_is_judged(tmp_path, server):
    base_checkpoint(tmp_path)
    data = synthetic_entries(tmp_path / 'd.json')
    fake_ollama(server, chunks=('7', '0'))
    out = tmp_path / 'out'
    proc = run_script('finetune_instruct.py', f'--data={data}', f'--init_from={tmp_path}', f'--out_dir={out}',
                      '--learning_rate=3e-3', '--num_epochs=4', '--eval_interval=10', '--eval_iters=2',
                      '--max_new_tokens=20', f'--judge_url={server.url}', '--mask_inputs=True')
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['val_loss'] < 0.5 * metrics['val_loss_before'], metrics  # learning the responses
    assert metrics['judge_score'] == 70 and metrics['test_responses'] == 6
    responses = json.loads((out / 'test_responses.json').read_text())
    assert len(responses) == 6 and all('model_response' in r and r['judge_score'] == 70 for r in responses)
    ckpt = load_checkpoint(out)
    assert ckpt['prompt_style'] == 'alpaca' and ckpt['tokenizer'] == 'bytes'
    # sample.py sees an instruction-tuned checkpoint and wraps --start in the template, stopping at end-of-text
    proc = run_script('sample.py', f'--out_dir={out}', '--start=Say yes.', '--temperature=0', '--num_samples=1')
    assert proc.returncode == 0 and '### Instruction:\nSay yes.\n\n### Response:\n' in proc.stdout, proc.stdout
    # ... and prints the learned answer (the greedy continuation of the same tokens), then stops
    prompt, response = greedy_response(out, 'Say yes.', 200)
    assert proc.stdout == prompt + response + '\n---------------\n' and response == 'yes', (proc.stdout, response)


def test_lora_trains_only_adapters_and_saves_plain_weights(tmp_path):
    base = base_checkpoint(tmp_path)
    data = synthetic_entries(tmp_path / 'd.json', n=40)
    out = tmp_path / 'out'
    proc = run_script('finetune_instruct.py', f'--data={data}', f'--init_from={tmp_path}', f'--out_dir={out}',
                      '--lora_rank=4', '--learning_rate=1e-2', '--max_iters=5', '--eval_interval=100',
                      '--eval_limit=1', '--max_new_tokens=5', '--judge=none')
    assert proc.returncode == 0, proc.stderr
    assert '6,144 trainable (LoRA rank 4)' in proc.stdout  # 2 layers x (768 + 384 + 960 + 960) adapter weights
    sd = load_checkpoint(out)['model']
    assert not any('lora' in k for k in sd)
    before = base.state_dict()
    assert torch.equal(sd['transformer.wte.weight'], before['transformer.wte.weight'])  # frozen
    assert not torch.equal(sd['transformer.h.0.attn.c_attn.weight'], before['transformer.h.0.attn.c_attn.weight'])


def test_bad_input_gives_one_line_errors(tmp_path):
    base_checkpoint(tmp_path)
    args = (f'--init_from={tmp_path}', f'--out_dir={tmp_path}/o', '--judge=none')
    bad = [{'instruction': 'a', 'input': '', 'output': 'b'}, {'instruction': 'x'}]
    (tmp_path / 'bad.json').write_text(json.dumps(bad))
    # the first case in a new interpreter: the real no-traceback contract (the others run in this process)
    assert_one_line_error(run_script('finetune_instruct.py', f'--data={tmp_path}/bad.json', *args), 'entry 1', 'input')
    (tmp_path / 'few.json').write_text(json.dumps([{'instruction': 'a', 'input': '', 'output': 'b'}] * 5))
    assert_one_line_error(run_here('finetune_instruct.py', f'--data={tmp_path}/few.json', *args), 'too few')
    assert_one_line_error(run_here('finetune_instruct.py', '--data=missing.json', *args), 'missing.json')
    synthetic_entries(tmp_path / 'ok.json')
    assert_one_line_error(run_here('finetune_instruct.py', f'--data={tmp_path}/ok.json', '--prompt_style=chatml',
                                   *args), 'chatml')
    entries = json.loads((tmp_path / 'ok.json').read_text())
    (tmp_path / 'lines.jsonl').write_text('\n'.join(json.dumps(e) for e in entries))
    assert len(fi.read_entries(tmp_path / 'lines.jsonl')) == 60
    assert not (tmp_path / 'o' / 'ckpt.pt').exists()


# -------------------------------------------------------------------- DPO (the chapter 7 bonus)

def synthetic_preferences(path, n=60):
    """Preference pairs with a learnable taste: the chosen answer is polite, the rejected one rude."""
    entries = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        entries.append({'instruction': f'Describe the {w}.', 'input': '', 'output': f'A nice {w}.',
                        'chosen': f'A lovely {w}, thank you.', 'rejected': f'Ugh, a {w}. Go away.'})
    path.write_text(json.dumps(entries), encoding='utf-8')
    return path


def test_dpo_loss_is_log2_at_the_start_and_masks_the_prompt(tmp_path):
    import copy
    import math
    from model import apply_lora
    from tokenizer import ByteTokenizer
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=257, n_layer=2, n_head=2, n_embd=32)).eval()
    tok = ByteTokenizer()
    entries = json.loads(synthetic_preferences(tmp_path / 'p.json').read_text())
    batch = [fi.encode_pair(e, tok, 'alpaca') for e in entries[:4]]
    loss, chosen, rejected = fi.dpo_batch(model, copy.deepcopy(model), batch, tok.eot_id, 256, 'cpu')
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and chosen.abs().max() < 1e-5
    apply_lora(model, 4, 8)  # adapters start at zero: the adapter-less reference is the same model
    loss, _, _ = fi.dpo_batch(model, None, batch, tok.eot_id, 256, 'cpu')
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    # only the response's tokens (and its end-of-text) are summed, not the prompt's
    prompt, response, _ = batch[0]
    x, y = fi.collate([(prompt + response, len(prompt))], tok.eot_id, mask_inputs=True)
    logp = torch.log_softmax(model(x)[0], -1)[0]
    targets = prompt[1:] + response + [tok.eot_id]
    expected = sum(logp[t, targets[t]] for t in range(len(prompt) - 1, len(targets)))
    assert fi.response_logprob(model, x, y).item() == pytest.approx(expected.item(), abs=1e-4)


def test_dpo_makes_chosen_responses_more_likely(tmp_path):
    base = base_checkpoint(tmp_path)
    data = synthetic_preferences(tmp_path / 'p.json')
    out = tmp_path / 'dpo'
    proc = run_script('finetune_instruct.py', '--method=dpo', f'--data={data}', f'--init_from={tmp_path}',
                      f'--out_dir={out}', '--dpo_learning_rate=1e-3', '--num_epochs=3', '--eval_interval=5',
                      '--eval_iters=2', '--eval_limit=2', '--max_new_tokens=10', '--judge=none')
    assert proc.returncode == 0, proc.stderr
    assert 'reward_accuracy' in proc.stdout and 'reward_margin' in proc.stdout
    m = json.loads((out / 'metrics.json').read_text())
    assert m['method'] == 'dpo' and m['reward_accuracy_before'] <= 0.5 < m['reward_accuracy'], m
    assert m['reward_margin'] > m['reward_margin_before'] + 1.0, m
    from tokenizer import ByteTokenizer
    from weights import load_pretrained
    policy, _ = load_pretrained(str(out))
    entry = json.loads(data.read_text())[-1]
    prompt, chosen, rejected = fi.encode_pair(entry, ByteTokenizer(), 'alpaca')
    x, y = fi.collate([(prompt + chosen, len(prompt))], 256, mask_inputs=True)
    with torch.no_grad():
        assert fi.response_logprob(policy.eval(), x, y) > fi.response_logprob(base.eval(), x, y) + 1.0


def test_responses_are_generated_without_dropout():
    from contextlib import nullcontext
    from tokenizer import ByteTokenizer
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=257, dropout=0.5))
    entry = {'instruction': 'Name a color.', 'input': ''}
    model.eval()
    expected = fi.respond(model, entry, ByteTokenizer(), 'alpaca', 'cpu', nullcontext(), 12)
    model.train()  # as evaluate() leaves it
    answers = {fi.respond(model, entry, ByteTokenizer(), 'alpaca', 'cpu', nullcontext(), 12) for _ in range(3)}
    assert answers == {expected} and model.training  # greedy and deterministic; the mode is restored


def test_a_llama_family_model_learns_the_chatml_format_and_carries_its_tokenizer(tmp_path):
    from conftest import make_llama_folder
    from tokenizer import get_tokenizer
    make_llama_folder(tmp_path / 'qwen', 'qwen2', spread=1.0)
    data = synthetic_entries(tmp_path / 'd.json', n=40)
    out = tmp_path / 'out'
    proc = run_script('finetune_instruct.py', f'--data={data}', f'--init_from={tmp_path / "qwen"}', f'--out_dir={out}',
                      '--prompt_style=chatml', '--learning_rate=3e-3', '--num_epochs=10',
                      '--eval_interval=100', '--max_new_tokens=8', '--judge=none', '--mask_inputs=True')
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['val_loss'] < 0.5 * metrics['val_loss_before'], metrics
    ckpt = load_checkpoint(out)
    assert ckpt['prompt_style'] == 'chatml' and ckpt['model_args']['pos_emb'] == 'rope'
    tok = get_tokenizer(ckpt['tokenizer'])  # the whole tokenizer.json travels in the checkpoint
    assert '<|im_end|>' in tok.enc.special_tokens_set
    # the answers stop at <|im_end|> (the padding the collate made the target), not at <|endoftext|>
    responses = json.loads((out / 'test_responses.json').read_text())
    assert sum(r['model_response'] == r['output'] for r in responses) >= len(responses) // 2, responses
    import shutil
    shutil.rmtree(tmp_path / 'qwen')  # sample.py needs nothing but the checkpoint
    proc = run_script('sample.py', f'--out_dir={out}', '--start=Say yes.', '--temperature=0', '--num_samples=1',
                      '--max_new_tokens=8')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith('<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\nyes'), proc.stdout
