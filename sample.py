"""
Sample text from a trained model or from GPT-2 (book chapter 5.3; nanoGPT's sample.py).
    python sample.py                                   # the checkpoint train.py wrote to out/
    python sample.py --init_from=gpt2 --start="Every effort moves you"
    python sample.py --start=FILE:prompt.txt --num_samples=1 --temperature=0
    python sample.py --init_from=qwen3-0.6b --start="The capital of France"    # the Llama family too
    python sample.py --init_from=smollm2-135m-instruct --chat=True            # a terminal chat
    python sample.py --init_from=smollm2-135m-instruct --serve=8000           # a web page and an OpenAI-style API
    python sample.py --init_from=qwen3-0.6b --chat=True --quantize=int8       # int8 weights: half the bytes to read
"""
import sys
from functools import partial

import torch

from configurator import configure, setup, die, compile_decoding
from quantize import cast_and_quantize, talk_dtype
from serve import ChatSession, TextStream, run_server
from weights import load_pretrained
from tokenizer import PROMPT_STYLES, chat_style_of, format_prompt, get_tokenizer, response_end_id

init_from = 'resume'  # resume (out_dir/ckpt.pt), gpt2..., qwen3-0.6b, a hub id, a ckpt.pt, or a HF-layout folder
out_dir = 'out'
start = '\n'  # the prompt, or FILE:path to read it from a file
num_samples = 3
max_new_tokens = 200
temperature = 0.8  # 0 = greedy; below 1 sharper, above 1 more random
top_k = 200  # sample only from the k most likely tokens (0 = all)
top_p = 1.0  # ... and only from the smallest set holding this much probability (1.0 = all)
seed = 1337
device = 'auto'
dtype = 'auto'  # float16/bfloat16 store the weights in 16 bits: half the bytes each token reads
compile = False  # torch.compile each generated token's step into one fixed graph (a CUDA graph on GPUs)
quantize = 'none'  # int8: int8 weights (quantize.py), half of bf16's bytes per token; int4 (CPU): a quarter
# (faster than int8 where the CPU has AVX-512, slower with AVX2 only: bench.py --quantize=int8,int4)
use_cache = True  # KV cache; False recomputes the whole context every token (for comparison)
chat = False  # a multi-turn terminal chat (instruction-tuned models): /reset forgets, /exit ends
chat_style = 'auto'  # auto (the checkpoint's, else the tokenizer's), alpaca, phi3, llama3, chatml, gemma
system = ''  # chat: a system message to open the conversation with
chat_context = 8192  # chat: the longest conversation kept, in tokens (at most the model's block_size)
serve = 0  # a port: serve an OpenAI-compatible API and a chat page there instead (serve.py; 0 = off)
host = '127.0.0.1'  # serve: the address to listen on (0.0.0.0 = every network; there is no authentication)
allow_origin = ''  # serve: web pages (origins, comma-separated, e.g. http://localhost:3000) allowed to call the API

write = partial(print, end='', flush=True)  # generated text, shown as it comes


def chat_loop(model, tokenizer, style, device, read=input, decode_step=None):
    """A terminal chat on serve.ChatSession (returns its replies): a conversation too long for chat_context
    loses its oldest exchanges for good, with a notice."""
    session = ChatSession(model, tokenizer, style, device, chat_context, system, decode_step)
    print(f"chat ({style} format, up to {session.capacity} tokens); /reset forgets the conversation, /exit ends it")
    messages, replies = [], []
    while True:
        try:
            line = read('> ')
        except EOFError:
            break
        if line.strip() == '/exit':
            break
        if line.strip() == '/reset':
            messages = []
            session.reset()
            print('(conversation forgotten)')
            continue
        if not line.strip():
            continue
        messages.append({'role': 'user', 'content': line})
        ids, reply_tokens, dropped, notice = session.fit(messages, max_new_tokens)
        del messages[:dropped]  # gone from the conversation for good: later turns do not bring them back
        if notice:
            print(f"notice: {notice}", file=sys.stderr)
        reply, _, _ = session.reply(ids, reply_tokens, write, temperature, top_k, top_p)
        print()
        replies.append(reply)
        messages.append({'role': 'assistant', 'content': reply})
    return replies


def encode_prompt(text, tokenizer, config):
    """Token ids (1, T) of the prompt; longer than the context: its last block_size tokens."""
    ids = tokenizer.encode(text) or [tokenizer.eot_id]
    if max(ids) >= config.vocab_size:
        die(f"the {tokenizer.name} tokenizer gives token id {max(ids)} but the model knows only "
            f"{config.vocab_size} tokens; this model was trained with another tokenizer")
    if len(ids) > config.block_size:
        print(f"notice: the prompt is {len(ids)} tokens, longer than the model's context of {config.block_size}; "
              f"keeping its last {config.block_size}", file=sys.stderr)
        ids = ids[-config.block_size:]
    return torch.tensor([ids], dtype=torch.long)


if __name__ == '__main__':
    configure(globals())
    if start.startswith('FILE:'):
        try:
            with open(start[5:], encoding='utf-8') as f:
                start = f.read()
        except (OSError, UnicodeDecodeError) as e:
            die(f"cannot read the prompt file {start[5:]} ({e.__class__.__name__}); give a UTF-8 text file")
    device, device_type, dtype, _ = setup(device, dtype, seed)
    try:
        talk_dtype(quantize, device_type, dtype)  # an unknown scheme stops before the model loads
        model, info = load_pretrained(init_from, out_dir=out_dir)  # out_dir's checkpoint, a published model, a path
        tokenizer, prompt_style = get_tokenizer(info['tokenizer']), info['prompt_style']
        style = chat_style_of(tokenizer, prompt_style) if chat_style == 'auto' else chat_style
        if (chat or serve) and style not in PROMPT_STYLES:
            raise ValueError(f"--chat_style={style}: use auto, {', '.join(PROMPT_STYLES)}")
        if chat or serve:
            response_end_id(tokenizer, style)  # the tokenizer must know how a reply ends
    except (OSError, ValueError) as e:
        die(e)
    eos_id = None
    if prompt_style:  # an instruction-tuned checkpoint (finetune_instruct.py): --start is the instruction
        start = format_prompt({'instruction': start.strip(), 'input': ''}, prompt_style)
        eos_id = response_end_id(tokenizer, prompt_style)  # end-of-text, or the chat format's end of a turn
    # generation reads every weight once a token: stored in dtype, not autocast (which converts them every step)
    cast_and_quantize(model.eval(), quantize, device_type, dtype).to(device)
    decode_step = compile_decoding(model, compile, device_type)
    if serve:  # the same chat, over HTTP
        run_server(ChatSession(model, tokenizer, style, device, chat_context, system, decode_step), host, serve,
                   init_from if init_from != 'resume' else out_dir, [o for o in allow_origin.split(',') if o],
                   max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        sys.exit(0)
    if chat:
        chat_loop(model, tokenizer, style, device, decode_step=decode_step)
        sys.exit(0)
    x = encode_prompt(start, tokenizer, model.config).to(device)
    with torch.no_grad():
        for k in range(num_samples):
            sys.stdout.write(start)
            stream = TextStream(tokenizer, (), write)
            model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                           eos_id=eos_id, use_cache=use_cache, decode_step=decode_step,
                           on_token=lambda ids: stream.add(int(ids[0])) if int(ids[0]) != eos_id else None)
            stream.finish()
            print('\n---------------')
