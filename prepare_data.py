"""
Text -> tokens -> token shards (book chapter 2). Also home of the tokenizers every script uses.
(Data sets and shard writing: issue 3.)
"""
from model import download  # noqa: F401  (the one download helper; model.py needs it for GPT-2 weights)

EOT = '<|endoftext|>'


class ByteTokenizer:
    """The 256 byte values plus end-of-text (id 256): any UTF-8 text, no files needed."""
    name, vocab_size, eot_id = 'bytes', 257, 256

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
    name, vocab_size, eot_id = 'gpt2', 50257, 50256

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


def get_tokenizer(name):
    if name == 'bytes':
        return ByteTokenizer()
    if name == 'gpt2':
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; use gpt2 or bytes")
