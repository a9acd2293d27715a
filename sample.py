"""
Sample text from a trained model or from GPT-2 (book chapter 5.3; nanoGPT's sample.py).
    python sample.py                                   # the checkpoint train.py wrote to out/
    python sample.py --init_from=gpt2 --start="Every effort moves you"
    python sample.py --start=FILE:prompt.txt --num_samples=1 --temperature=0
"""
import codecs
import os
import sys

import torch

from configurator import configure, setup, die, maybe_compile
from model import load_pretrained
from prepare_data import format_prompt, get_tokenizer

init_from = 'resume'  # 'resume' (out_dir/ckpt.pt), a GPT-2 size (gpt2, gpt2-medium, ...), a ckpt.pt, or a HF-layout folder
out_dir = 'out'
start = '\n'  # the prompt, or FILE:path to read it from a file
num_samples = 3
max_new_tokens = 200
temperature = 0.8  # 0 = greedy; below 1 sharper, above 1 more random
top_k = 200  # sample only from the k most likely tokens (0 = all)
top_p = 1.0  # ... and only from the smallest set holding this much probability (1.0 = all)
seed = 1337
device = 'auto'
dtype = 'auto'  # float16/bfloat16 store the weights in 16 bits: half the bytes per token (2.8x faster on our CPU)
compile = False  # torch.compile the model's trunk (dynamic shapes; meant for GPUs)
use_cache = True  # KV cache; False recomputes the whole context every token (for comparison)


def load_model(init_from, out_dir):
    """(model, tokenizer, prompt style or None) from out_dir's checkpoint, a GPT-2 size, or a
    checkpoint / HF-layout path."""
    model, info = load_pretrained(os.path.join(out_dir, 'ckpt.pt') if init_from == 'resume' else init_from)
    return model, get_tokenizer(info['tokenizer']), info['prompt_style']


def encode_prompt(text, tokenizer, config):
    """Token ids (1, T) of the prompt; longer than the context: its last block_size tokens."""
    ids = tokenizer.encode(text) or [tokenizer.eot_id]
    if max(ids) >= config.vocab_size:
        raise ValueError(f"the {tokenizer.name} tokenizer gives token id {max(ids)} but the model knows only "
                         f"{config.vocab_size} tokens; this model was trained with another tokenizer")
    block_size = config.block_size
    if len(ids) > block_size:
        print(f"notice: the prompt is {len(ids)} tokens, longer than the model's context of {block_size}; "
              f"keeping its last {block_size}", file=sys.stderr)
        ids = ids[-block_size:]
    return torch.tensor([ids], dtype=torch.long)


def stream_to(out, tokenizer, eos_id=None):
    """An on_token callback writing each new token's text as it comes (not eos_id); a character
    split across tokens is printed once complete."""
    decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')

    def on_token(next_id):
        if int(next_id[0]) != eos_id:
            out.write(decoder.decode(tokenizer.decode_bytes([int(next_id[0])])))
            out.flush()
    return on_token


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
        model, tokenizer, prompt_style = load_model(init_from, out_dir)
    except (OSError, ValueError) as e:
        die(e)
    eos_id = None
    if prompt_style:  # an instruction-tuned checkpoint (finetune_instruct.py): --start is the instruction
        start = format_prompt({'instruction': start.strip(), 'input': ''}, prompt_style)
        eos_id = tokenizer.eot_id  # the response ends with end-of-text
    # Generation reads every weight once per token, so we store them in the chosen dtype rather
    # than autocast (which would re-read the float32 weights and convert them at every step).
    model.eval().to(device=device, dtype=getattr(torch, dtype))
    if compile:
        model.hidden_states = maybe_compile(model.hidden_states, True, device_type, dynamic=True)
    try:
        x = encode_prompt(start, tokenizer, model.config).to(device)
    except ValueError as e:
        die(e)
    with torch.no_grad():
        for k in range(num_samples):
            sys.stdout.write(start)
            model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                           eos_id=eos_id, use_cache=use_cache, on_token=stream_to(sys.stdout, tokenizer, eos_id))
            print('\n---------------')
