"""finetune_grpo.py (the sequel, "Build a Reasoning Model (From Scratch)"): the verifiers, the
GRPO loss, its masks, a short run that learns, MATH-500's two published forms, and a Qwen3-shaped run that resumes."""
import copy
import json
import math
from contextlib import nullcontext

import pytest
import torch

import finetune_grpo as fg
import prepare_data
from conftest import FIXTURES, assert_one_line_error, run_here, run_script, spread_weights
from configurator import optimizer_step
from model import GPT, GPTConfig, apply_lora, generate_batch, token_logprobs
from weights import load_checkpoint, load_pretrained, save_checkpoint

# (completion, reference answer, whether the math verifier must find them equal)
MATH_CASES = [
    (r"so the answer is $\boxed{5}$.", '5', True),
    (r"\boxed{\frac{1}{2}}", r'\frac12', True),
    (r"\boxed{\dfrac{3}{4}}", r'\frac{3}{4}', True),
    (r"\boxed{\tfrac{3}{4}}", '3/4', True),
    (r"\boxed{0.5}", r'\frac{1}{2}', True),
    (r"\boxed{\frac{2}{4}}", '1/2', True),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r'\left( 3, \frac{\pi}{2} \right)', True),
    (r"\boxed{5.0}", '5', True),
    (r"\boxed{5.00}", '5', True),
    (r"\boxed{1,000}", '1000', True),
    (r"\boxed{1,234,567}", '1234567', True),
    (r"\boxed{10\text{ cm}}", '10', True),
    (r"\boxed{10 \text{ inches}}", r'10\text{ inches}', True),
    (r"\boxed{\text{Evelyn}}", 'Evelyn', True),
    (r"\boxed{\text{(C)}}", '(C)', True),
    (r"\boxed{90^\circ}", '90', True),
    (r"\boxed{25\%}", '25', True),
    (r"\boxed{x = 7}", '7', True),
    (r"\boxed{ 2 x + 3 }", '2x+3', True),
    (r"\boxed{\sqrt3}", r'\sqrt{3}', True),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r'\frac{\sqrt{3}}{2}', True),
    (r"\boxed{\frac{a+1}{b}}", '(a+1)/b', True),
    (r"\boxed{-3}", '-3', True),
    (r"\boxed{\$18.90}", r'\$18.90', True),
    (r"first \boxed{3} then corrected: \boxed{4}", '4', True),
    (r"\boxed{\{1, 2\}}", r'\{1,2\}', True),
    ("The total is 42.", '42', True),  # no \boxed{}: the last number
    ("3 apples and 4 pears make 7", '7', True),
    ("It costs 1,500 dollars", '1500', True),
    ("half of it: 1/2", r'\frac{1}{2}', True),
    ("so -12 is the answer", '-12', True),
    ("x is .5", '1/2', True),
    (r"\boxed{\frac{-1}{2}}", r'-\frac12', True),
    (r"\boxed{-\frac{1}{2}}", '-0.5', True),
    (r"\boxed{\frac1{23}}", '1/23', True),  # LaTeX's arguments: one character or one {group} each
    (r"\boxed{\frac{\pi}{2}}", r'\frac\pi2', True),  # ... or one command
    (r"\boxed{\frac{\sqrt3}2}", r'\frac{\sqrt{3}}{2}', True),
    (r"\boxed{2\frac{\pi}{3}}", r'\frac{2\pi}{3}', True),  # a product, not a mixed number: both read 2\pi/3
    (r"\boxed{6\frac{1}{4}}", r'\frac{25}{4}', True),  # a mixed number
    (r"\boxed{-6\frac14}", '-6.25', True),
    (r"\boxed{2 \sqrt 3}", r'2\sqrt{3}', True),
    (r"\boxed{(1,5]}", r'\left( 1, 5 \right]', True),
    (r"\boxed{(-\infty, 2)}", r'(-\infty,2)', True),
    (r"\boxed{\$5}", '5', True),
    (r"\boxed{\$18.90}", '18.9', True),
    (r"\boxed{1{,}000}", '1000', True),
    (r"\boxed{5.}", '5', True),
    (r"\boxed{x=5}", '5', True),
    (r"\boxed{24}", r'24\text{ cm}^2', True),  # a unit with its power
    (r"\boxed{C}", r'\text{(C)}', True),
    (r"\boxed{\textbf{(C)}}", '(C)', True),
    (r"\boxed{7, 5}", '5, 7', True),  # several answers: the same set in any order
    (r"\boxed{x=5 \text{ or } x=7}", '7,5', True),
    ("The answer is 5.", '5', True),  # a full stop, not a decimal point
    ("The answer is 12, since 3 groups of 4.", '12', True),  # "answer is" wins over a later number
    ("Answer: $1/2$", r'\frac12', True),
    # must not match
    (r"\boxed{5}", '50', False),
    (r"\boxed{-3}", '3', False),
    (r"\boxed{\frac{1}{2}}", r'\frac{1}{3}', False),
    (r"\boxed{1/2}", '2/1', False),
    (r"\boxed{\sqrt{2}}", r'\sqrt{3}', False),
    (r"\boxed{(1,2)}", '(2,1)', False),
    (r"\boxed{10.5}", '10', False),
    (r"\boxed{4} but the question wanted 5", '5', False),  # the box wins over a later number
    ("no answer here", '0', False),
    ("", '7', False),
    (r"\boxed{", '7', False),  # cut off before the box closed
    (r"\boxed{2x+2}", '2(x+1)', False),  # no computer algebra
    ("The answer is 7 or 8", '7', False),
    (r"\boxed{12}", '1,2', False),
    (r"\boxed{(1,500)}", '1500', False),  # a tuple is never a number
    (r"\boxed{1, 500}", '1500', False),  # nor is a list: only a bare number's thousands groups lose their commas
    ("The point is (1,500).", '1500', False),
    ("It costs 1,5000", '15000', False),  # no thousands group: two numbers
    (r"\boxed{5\text{ or }7}", '57', False),  # several answers never join into one
    (r"\boxed{5 \text{ and } 7}", '5', False),
    (r"\boxed{\frac123}", '1/23', False),  # LaTeX reads \frac{1}{2}3
    (r"\boxed{\frac{1}{2}3}", '1/23', False),
    (r"\boxed{6\frac14}", r'\frac{61}{4}', False),  # a mixed number: 6 + 1/4
    ("the answer is 8 or 7", '7', False),  # one of a list is not the answer
    ("so we get\n8 or 7", '7', False),
    ("The final answer is $\\frac{1}{2}$.", '2', False),  # a LaTeX argument is not the last number
    ("The final answer is $x^2$.", '2', False),  # nor a power
    (r"\boxed{(7, 5)}", '(5,7)', False),  # a tuple keeps its order
    (r"\boxed{(1,5]}", '[1,5]', False),
    (r"\boxed{2\sqrt{3}}", r'\sqrt{12}', False),  # no computer algebra
]


def test_math_verifier_cases():
    assert len(MATH_CASES) >= 40 and sum(not ok for *_, ok in MATH_CASES) >= 10
    wrong = [(c, a) for c, a, ok in MATH_CASES if fg.is_correct(c, a, 'math') != ok]
    assert not wrong, wrong
    assert fg.extract_math('so we get\n8 or 7') is None and fg.extract_math('(3, 4)') is None  # no one answer


def test_exact_verifier_reads_the_last_line():
    assert fg.is_correct('3+4=7\n1+2=3\n37\n', '37', 'exact')
    assert not fg.is_correct('37\n38', '37', 'exact')
    assert not fg.is_correct('', '37', 'exact')
    assert not fg.is_correct('137', '37', 'exact')


def test_a_completion_that_never_ends_gets_no_reward():
    from tokenizer import get_tokenizer
    tok = get_tokenizer('bytes')
    ids = tok.encode('7+5=12\n12')
    assert fg.reward(ids + [tok.eot_id], '12', tok.eot_id, tok, 'exact') == 1.0
    assert fg.reward(ids, '12', tok.eot_id, tok, 'exact') == 0.0  # cut off by max_new_tokens: right text, no reward
    assert fg.reward(tok.encode(r'\boxed{3}') + [tok.eot_id], '3', tok.eot_id, tok, 'math') == 1.0


def test_group_advantages_and_grpo_loss_equal_the_hand_computation():
    rewards = torch.tensor([1., 0., 0., 1., 1., 0.])  # two groups of three
    adv = fg.group_advantages(rewards, 3)
    expected = []
    for g in (rewards[:3].tolist(), rewards[3:].tolist()):
        mean = sum(g) / 3
        std = math.sqrt(sum((r - mean) ** 2 for r in g) / 2)  # unbiased, as the sequel's torch.std
        expected += [(r - mean) / (std + 1e-4) for r in g]
    assert adv.tolist() == pytest.approx(expected)
    assert expected[0] == pytest.approx((2 / 3) / math.sqrt(1 / 3), rel=1e-3)  # 1.1547: the one right of three
    # per-token log-probs of six completions of 1-3 tokens (the mask marks the completion's tokens; -9: padding)
    logp = torch.tensor([[-1., -2., -9.], [-.5, -9., -9.], [-1., -1., -1.], [-.2, -.3, -9.], [-3., -9., -9.],
                         [-.1, -.1, -.1]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]).bool()
    n_tokens = 13
    hand = 0.0
    for i in range(6):
        for t in range(3):
            if mask[i, t]:
                hand -= adv[i].item() * logp[i, t].item()
    assert fg.grpo_loss(logp, mask, adv, n_tokens).item() == pytest.approx(hand / n_tokens)
    # the KL term (k3 estimator): exp(ref - logp) - (ref - logp) - 1 per completion token, times beta
    ref = logp - 0.5 * mask
    kl = sum(math.exp(-0.5) + 0.5 - 1 for i in range(6) for t in range(3) if mask[i, t])
    assert fg.grpo_loss(logp, mask, adv, n_tokens, ref, 0.1).item() == pytest.approx((hand + 0.1 * kl) / n_tokens)
    assert fg.grpo_loss(logp, mask, adv, n_tokens, logp, 0.1).item() == pytest.approx(hand / n_tokens)


def tiny_model(seed=0, vocab=257):
    torch.manual_seed(seed)
    return spread_weights(GPT(GPTConfig(block_size=32, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32)), 5)


def step_loss(model, prompts, completions, rewards, group_size=2):
    """The GRPO loss of one step through the model, as finetune_grpo computes it (one chunk)."""
    x, y = fg.completion_batch(prompts, completions, 0, 'cpu')
    logp, mask = token_logprobs(model, x, y)
    return fg.grpo_loss(logp, mask, fg.group_advantages(torch.tensor(rewards), group_size), int(mask.sum()))


def test_a_group_whose_rewards_are_all_equal_gives_zero_gradient():
    model = tiny_model()
    prompts, completions = [[5, 6, 7]] * 2 + [[8, 9]] * 2, [[1, 2, 3], [4, 0], [10, 11], [12, 13, 0]]
    step_loss(model, prompts, completions, [1., 1., 0., 0.]).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    step_loss(model, prompts, completions, [1., 0., 0., 0.]).backward()  # one group differs: gradient flows
    assert any(p.grad is not None and p.grad.any() for p in model.parameters())


def test_prompt_and_padding_tokens_never_get_gradient():
    model = tiny_model()
    prompts, completions = [[5, 6, 7, 8, 9], [3]], [[1, 2], [4, 0, 11, 12]]
    x, y = fg.completion_batch(prompts, completions, 99, 'cpu')
    assert x.tolist() == [[5, 6, 7, 8, 9, 1], [3, 4, 0, 11, 99, 99]]  # right-padded: positions as in generation
    assert y.tolist() == [[-100] * 4 + [1, 2], [4, 0, 11, 12, -100, -100]]  # targets: the completions only
    seen = {}
    model.lm_head.register_forward_hook(lambda m, i, out: seen.update(logits=out) or out.retain_grad())
    step_loss(model, prompts, completions, [1., 0.], group_size=2).backward()
    grad = seen['logits'].grad.abs().sum(-1)  # (B, T): which positions' predictions the loss reaches
    assert (grad[0, :4] == 0).all() and (grad[0, 4:] > 0).all()  # row 0: positions 0-3 predict prompt tokens
    assert (grad[1, :4] > 0).all() and (grad[1, 4:] == 0).all()  # row 1: position 4 on is padding


def test_the_update_scores_each_token_in_the_context_it_was_generated_in():
    """Left-padded prompts in generation, right-padded rows in the update: each completion's tokens are the
    update's greedy choices, and each row's log-probs equal the row's alone."""
    model = tiny_model(1).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42]]
    completions = generate_batch(model, prompts, 256, 6)
    assert len({tuple(c) for c in completions}) == 3
    x, y = fg.completion_batch(prompts, completions, 256, 'cpu')
    logits = model(x)[0]
    for i, (p, c) in enumerate(zip(prompts, completions)):
        assert logits[i, len(p) - 1:len(p) - 1 + len(c)].argmax(-1).tolist() == c
        xa, ya = fg.completion_batch([p], [c], 256, 'cpu')
        alone = token_logprobs(model, xa, ya)[0][0]
        assert torch.allclose(token_logprobs(model, x, y)[0][i, :alone.size(0)], alone, atol=1e-5)
    hot = torch.log_softmax(logits / 2, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != -100)
    assert torch.allclose(token_logprobs(model, x, y, temperature=2.0)[0], hot, atol=1e-5)  # scored as sampled


class Letters:
    """A tokenizer of three letters and an end token, so that a random model ends its completions often."""
    eot_id = 3

    def decode(self, ids):
        return ''.join('abc'[i] for i in ids)


def test_a_short_grpo_run_raises_the_mean_reward(monkeypatch):
    """A toy verifier rewards completions that end and are mostly the letter a; 20 GRPO steps learn it."""
    monkeypatch.setitem(fg.VERIFIERS, 'toy', (lambda c: 'yes' if c.count('a') * 2 > len(c) else 'no', str))
    for key, value in dict(verifier='toy', group_size=8, max_new_tokens=6, temperature=1.0, kl_beta=0.0,
                           gen_batch_size=64).items():
        monkeypatch.setattr(fg, key, value)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=4, n_layer=1, n_head=2, n_embd=32))
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    generator = torch.Generator().manual_seed(0)
    batch, prompts = [{'problem': '', 'answer': 'yes'}] * 4, [[0, 1], [1, 2], [2, 0], [1, 1]]
    means = []
    for _ in range(20):
        rows, completions, rewards = fg.rollouts(model, batch, prompts, 3, Letters(), nullcontext(), generator)
        last, _ = fg.grpo_backward(model, None, rows, completions, fg.group_advantages(rewards, 8), 3, 'cpu',
                                   nullcontext(), scaler)
        optimizer_step(last, optimizer, scaler, params)
        means.append(rewards.mean().item())
    assert sum(means[-5:]) / 5 > sum(means[:5]) / 5 + 0.3, means


@pytest.mark.parametrize('lora', [True, False])
def test_grpo_backward_in_chunks_gives_the_gradients_of_one_chunk(monkeypatch, lora):
    """Four chunks of two completions backpropagate what one chunk of eight does (the returned last chunk's loss
    backpropagated by the caller), the KL term's to the model without its adapters (LoRA) or a frozen copy too."""
    for key, value in dict(temperature=1.5, kl_beta=0.1).items():
        monkeypatch.setattr(fg, key, value)
    model, reference = tiny_model(2), None
    with torch.no_grad():
        if lora:  # the reference: the model without its adapters
            apply_lora(model, 4, 16)
        else:
            reference = copy.deepcopy(model).requires_grad_(False)
        # the policy away from its reference (LoRA's B starts at zero), so that the KL term's gradient is not zero
        for p in [p for p in model.parameters() if p.requires_grad]:
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (3, 5, 2, 4, 3, 6, 1, 2)]
    completions = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (2, 4, 1, 6, 3, 2, 5, 1)]
    advantages, scaler = torch.randn(8, generator=g), torch.amp.GradScaler('cpu', enabled=False)
    grads, losses = [], []
    for size in (8, 2):
        monkeypatch.setattr(fg, 'gen_batch_size', size)
        model.zero_grad(set_to_none=True)
        last, total = fg.grpo_backward(model, reference, rows, completions, advantages, 0, 'cpu', nullcontext(), scaler)
        last.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        losses.append(total)
    assert grads[0].keys() == grads[1].keys() and all(t.any() for t in grads[0].values())
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)


def test_both_published_forms_of_math500_load_through_the_download(tmp_path, server, monkeypatch):
    rows = [{'problem': 'What is $1+1$?', 'solution': r'It is $\boxed{2}$.', 'answer': '2', 'subject': 'Algebra',
             'level': 1, 'unique_id': 'test/algebra/1.json'},
            {'problem': 'Half of one?', 'solution': r'$\boxed{\frac12}$', 'answer': r'\frac{1}{2}',
             'subject': 'Algebra', 'level': 2, 'unique_id': 'test/algebra/2.json'}]
    server.routes['/math500_test.json'] = json.dumps(rows, indent=4).encode()  # the sequel's JSON list
    server.routes['/test.jsonl'] = ''.join(json.dumps(r) + '\n' for r in rows).encode()  # the JSON-lines test set
    monkeypatch.setitem(prepare_data.PROBLEM_SETS, 'math500', (server.url + '/math500_test.json', 'math500_test.json'))
    monkeypatch.setitem(prepare_data.PROBLEM_SETS, 'math500_jsonl', (server.url + '/test.jsonl', 'math500_test.jsonl'))
    for name in ('math500', 'math500_jsonl'):
        got = prepare_data.load_problems(name, tmp_path)
        assert [(e['problem'], e['answer']) for e in got] == [(r['problem'], r['answer']) for r in rows]
        assert prepare_data.load_problems(name, tmp_path) == got  # the second time from the file, not the server
    assert len(server.requests) == 2 and (tmp_path / 'math500_test.jsonl').is_file()
    assert fg.format_problem(rows[0], 'sequel').endswith('Question:\nWhat is $1+1$?\n\nAnswer:')
    assert '\\boxed{ANSWER}' in fg.format_problem(rows[0], 'sequel')
    assert fg.format_problem({'problem': '12+34', 'answer': '46'}, 'plain') == '12+34\n'


def qwen3_folder(folder):
    """A random Qwen3-shaped model (q/k norms, head_dim != n_embd / n_head) with a Qwen tokenizer.json, made to
    answer with the digits 0-2 and end-of-text (so that the verifier's rewards vary from the first step): the
    residual stream's dimension 0 is a constant no block writes to, which the head reads in favour of them."""
    from weights import save_pretrained
    from tokenizer import get_tokenizer
    tokenizer_json = (FIXTURES / 'tokenizers' / 'qwen2' / 'tokenizer.json').read_text(encoding='utf-8')
    tok = get_tokenizer({'name': 'qwen', 'json': tokenizer_json})
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                          head_dim=32, qk_norm=True, norm='rmsnorm', pos_emb='rope', mlp='swiglu', mlp_hidden=96,
                          bias=False, tie_embeddings=False))
    favoured = [tok.eot_id] + [tok.encode(d)[0] for d in '012']
    with torch.no_grad():
        model.transformer.wte.weight[:, 0] = 30.0
        for name, p in model.named_parameters():
            if name.endswith('c_proj.weight'):
                p[0] = 0.0
        model.lm_head.weight[:, 0] = -0.5
        model.lm_head.weight[favoured, 0] = 0.5
    save_pretrained(model, folder, tokenizer_json=tokenizer_json)
    return tok


def test_grpo_on_a_qwen3_shaped_model_runs_end_to_end_and_resumes_exactly(tmp_path):
    qwen3_folder(tmp_path / 'qwen3')
    problems = [{'problem': f'What is {i} + 1?', 'answer': str(i % 3)} for i in range(16)]  # answers the
    (tmp_path / 'p.json').write_text(json.dumps(problems), encoding='utf-8')  # random model's numbers often hit
    args = ['finetune_grpo.py', f'--init_from={tmp_path / "qwen3"}', f'--data={tmp_path / "p.json"}',
            f'--test_data={tmp_path / "p.json"}', '--eval_limit=4', '--batch_size=2', '--group_size=4', '--lora_rank=4',
            '--kl_beta=0.1', '--learning_rate=1e-2', '--max_new_tokens=12', '--temperature=1.5', '--sc_k=2',
            '--eval_interval=2', '--max_iters=4']
    whole = run_script(*args, f'--out_dir={tmp_path / "whole"}')
    assert whole.returncode == 0, whole.stderr
    assert 'before training: held-out greedy' in whole.stdout and 'held-out accuracy' in whole.stdout
    assert 'sequel prompts, math verifier' in whole.stdout and 'tokens/s' in whole.stdout
    cut = run_script(*args[:-1], '--max_iters=2', f'--out_dir={tmp_path / "cut"}')
    assert cut.returncode == 0, cut.stderr
    resumed = run_script(*[a for a in args if not a.startswith('--init_from')], '--init_from=resume',
                         f'--out_dir={tmp_path / "cut"}')
    assert resumed.returncode == 0 and 'resumed at step 2' in resumed.stdout, resumed.stderr
    a, b = load_checkpoint(tmp_path / 'whole'), load_checkpoint(tmp_path / 'cut')
    assert a['iter_num'] == b['iter_num'] == 4
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert a['metrics']['step 4'] == b['metrics']['step 4'] and a['metrics']['before'] == b['metrics']['before']
    assert any(v.abs().max() > 0 for k, v in a['lora'].items() if 'lora_B' in k)  # the adapters did move
    bad = run_here(*[a for a in args if not a.startswith('--init_from')], '--init_from=resume', '--lora_rank=0',
                   f'--out_dir={tmp_path / "cut"}')
    assert_one_line_error(bad, '--lora_rank=0')
    # the trained model evaluated alone: with the prompts it was trained on (its checkpoint says which), no training
    evaluated = run_script(*[a for a in args if not a.startswith('--init_from')], f'--init_from={tmp_path / "whole"}',
                           '--eval_only=True', '--data=none.json', f'--out_dir={tmp_path / "eval"}')
    assert evaluated.returncode == 0, evaluated.stderr
    assert 'sequel prompts' in evaluated.stdout and 'held-out greedy' in evaluated.stdout
    assert 'step 1' not in evaluated.stdout and not (tmp_path / 'eval' / 'ckpt.pt').exists()
    resumed_eval = run_script(*[a for a in args if not a.startswith('--init_from')], '--init_from=resume',
                              '--eval_only=True', '--max_iters=8', f'--out_dir={tmp_path / "cut"}')
    assert resumed_eval.returncode == 0 and 'held-out greedy' in resumed_eval.stdout, resumed_eval.stderr
    assert 'step 5' not in resumed_eval.stdout and load_checkpoint(tmp_path / 'cut')['iter_num'] == 4


def test_full_weight_grpo_with_a_frozen_reference_resumes_exactly(tmp_path):
    """--lora_rank=0: every weight trains and the KL term's reference is a frozen copy of the starting point, which
    a resumed run loads again; 2 steps + 2 resumed end where 4 steps do."""
    qwen3_folder(tmp_path / 'qwen3')
    problems = [{'problem': f'What is {i} + 1?', 'answer': str(i % 3)} for i in range(8)]
    (tmp_path / 'p.json').write_text(json.dumps(problems), encoding='utf-8')
    args = ['finetune_grpo.py', f'--data={tmp_path / "p.json"}', f'--test_data={tmp_path / "p.json"}',
            '--eval_limit=2', '--batch_size=2', '--group_size=2', '--lora_rank=0', '--kl_beta=0.1',
            '--learning_rate=1e-3', '--max_new_tokens=8', '--temperature=1.5', '--sc_k=0', '--eval_interval=2']
    whole = run_script(*args, f'--init_from={tmp_path / "qwen3"}', '--max_iters=4', f'--out_dir={tmp_path / "whole"}')
    assert whole.returncode == 0, whole.stderr
    cut = run_script(*args, f'--init_from={tmp_path / "qwen3"}', '--max_iters=2', f'--out_dir={tmp_path / "cut"}')
    assert cut.returncode == 0, cut.stderr
    resumed = run_script(*args, '--init_from=resume', '--max_iters=4', f'--out_dir={tmp_path / "cut"}')
    assert resumed.returncode == 0 and 'resumed at step 2' in resumed.stdout, resumed.stderr
    a, b = load_checkpoint(tmp_path / 'whole'), load_checkpoint(tmp_path / 'cut')
    assert a['iter_num'] == b['iter_num'] == 4 and a['lora'] is None
    assert a['model'].keys() == b['model'].keys() and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert a['metrics']['step 4'] == b['metrics']['step 4'] and a['metrics']['before'] == b['metrics']['before']
    start = load_pretrained(str(tmp_path / 'qwen3'))[0].state_dict()
    assert sum(not torch.equal(v, start[k]) for k, v in a['model'].items()) > len(start) // 2  # the weights did move


def test_bad_grpo_input_gives_one_line_errors(tmp_path):
    model = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / 'm' / 'ckpt.pt', model, 'bytes', {})
    (tmp_path / 'p.json').write_text(json.dumps([{'problem': '1+1', 'answer': '2'}] * 4), encoding='utf-8')
    (tmp_path / 'bad.json').write_text(json.dumps([{'problem': '1+1'}]), encoding='utf-8')
    base = ['finetune_grpo.py', f'--init_from={tmp_path / "m"}', f'--data={tmp_path / "p.json"}',
            f'--test_data={tmp_path / "p.json"}', f'--out_dir={tmp_path / "o"}']
    # the first case in a new interpreter: the real no-traceback contract (the others run in this process)
    assert_one_line_error(run_script(*base, f'--test_data={tmp_path / "bad.json"}'), 'entry 0', 'answer')
    assert_one_line_error(run_here(*base, '--verifier=sympy'), '--verifier=sympy')
    assert_one_line_error(run_here(*base, '--group_size=1'), '--group_size=1')
    assert_one_line_error(run_here(*base, '--max_new_tokens=40'), '--max_new_tokens=40')
    assert_one_line_error(run_here(*base, '--init_from=resume'), 'ckpt.pt')
