"""
int8 and int4 weight-only decoding, for talking to a model, never for training (gpt-fast's quantize.py):
    from quantize import cast_and_quantize
    cast_and_quantize(model, 'int8', 'cpu', 'bfloat16')   # in place; then model.generate(...) as before
Each generated token reads every weight once, so where memory bandwidth is the limit (a CPU, any device at
batch 1) a quarter or half of bf16's bytes is up to four or two times the tokens/s. The blocks' and the
head's Linears become Int8Linear / Int4Linear, a tied embedding reads int8 rows. Imports model.py only.
"""
import torch
import torch.nn as nn
from torch.nn import functional as F

from model import merge_lora, swap_modules

INT4_GROUP = 32  # int4: weights per scale and zero (gpt-fast's default; smaller groups round less, store more)


def row_chunks(w, rows=512):
    """(first row, float32 copy of the next `rows` rows) of w, in turn: the float32 working copies stay small
    (2 MB at 1,024 columns; Qwen3-0.6B's head whole would be 620 MB). First, and every 32 chunks, the C heap's
    freed memory goes back to the system: glibc does not always reuse the working copies' (nor the weights the
    previous layer dropped), and the peak then grew by up to 0.7x the model's bytes (tests/test_quantize.py)."""
    for i in range(0, w.size(0), rows):
        if i % (32 * rows) == 0:
            release_freed_memory()
        yield i, w[i:i + rows].float()


def quantize_rows(w):
    """(int8 (out, in), scale (out,)) with w ~= int8 * scale[:, None]: symmetric, one scale per output channel
    (absmax / 127, so zero stays zero and each row's largest weight is exact)."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.size(0), dtype=w.dtype, device=w.device)
    for i, chunk in row_chunks(w):
        # rounded to the scale's own dtype first, so the int8 values fit the scale that is stored
        s = (chunk.abs().amax(dim=1).clamp(min=1e-12) / 127).to(w.dtype)
        q[i:i + len(chunk)] = (chunk / s.float()[:, None]).round().clamp(-127, 127)
        scale[i:i + len(chunk)] = s
    return q, scale


def int8_kernel_applies(x, weight):
    """Whether torch._weight_int8pack_mm computes x @ W^T here: on a CPU it is vectorised for bfloat16
    activations only (in float32 it is slower than dequantizing first), on MPS for any float where both sides
    of the weight are multiples of 32 (its kernel's tiles: GPT-2's unpadded 50,257-row head is not). On CUDA the
    plain dequantize-and-matmul is used: torch.compile fuses it into one kernel (gpt-fast's way)."""
    if x.device.type == 'mps':
        return weight.size(0) % 32 == 0 and weight.size(1) % 32 == 0
    return x.device.type == 'cpu' and x.dtype == torch.bfloat16


class Int8Linear(nn.Module):
    """A Linear whose weights are int8 with one scale per output channel, for decoding: each token reads
    every weight once, so half of bf16's bytes is up to twice the tokens/s where memory bandwidth is the
    limit (a CPU, or any device at batch 1). Made from a Linear (whose weights are then free to go).
    Never trained: the int8 values cannot take gradient steps (fine-tune first, then quantize to talk)."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_rows(linear.weight.detach())
        # frozen Parameters rather than buffers: module.to() keeps a shared Parameter shared (the tied
        # embedding reads these), while it would copy a shared buffer twice
        self.weight = nn.Parameter(weight, requires_grad=False)  # (out, in) int8
        self.scale = nn.Parameter(scale, requires_grad=False)  # (out,), cast with the model's dtype
        self.bias = linear.bias

    def forward(self, x):
        if int8_kernel_applies(x, self.weight):
            # the kernel takes (rows, in) activations, contiguous on MPS (the head reads x[:, -1] of a batch)
            rows = x.reshape(-1, x.size(-1)).contiguous()
            y = torch._weight_int8pack_mm(rows, self.weight, self.scale.to(x.dtype))
            y = y.view(*x.shape[:-1], self.out_features)
        else:  # dequantized first, so float16 holds what an unquantized layer holds (int8 * x alone can overflow it),
            # in the dtype autocast would run the matmul in (not a float32 copy of the weights from a float32 input)
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            y = F.linear(x.to(dtype), self.weight.to(dtype) * self.scale.to(dtype)[:, None])
        return y if self.bias is None else y + self.bias


class Int8Embedding(nn.Module):
    """A token embedding in int8 rows with one scale each: a lookup dequantizes just the rows it reads. Given the
    head's own Parameters (int8), it stays tied to the head; given rows of its own (int4, whose packed head rows
    cannot be looked up), it holds them."""

    def __init__(self, weight, scale):
        super().__init__()
        self.weight, self.scale = weight, scale  # (vocab, C) int8, (vocab,): Parameters

    def forward(self, idx):
        return self.weight[idx].to(self.scale.dtype) * self.scale[idx, None]  # (B, T, C)


class Int4Linear(nn.Module):
    """A Linear whose weights are 4 bits, a quarter of bf16's bytes, for decoding on a CPU. Each run of `group`
    weights along a row has its own scale and zero (asymmetric: 16 levels from the run's smallest weight to its
    largest), the layout of PyTorch's CPU kernel (_weight_int4pack_mm_for_cpu), which computes (q - 8) * scale +
    zero. The packed weights are in that kernel's own tiled order, made for the CPU that packs them: CPU only,
    and made where the model talks (never saved)."""

    def __init__(self, linear, group=INT4_GROUP):
        super().__init__()
        self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, group
        w = linear.weight.detach()
        packed, scale_and_zero = [], []
        for _, chunk in row_chunks(w):
            chunk = chunk.view(-1, self.in_features // group, group)  # (rows, groups, group)
            low, high = chunk.amin(dim=2), chunk.amax(dim=2)
            # rounded to the stored dtype first, so the 4-bit values fit the scale and zero that are stored
            scale = ((high - low).clamp(min=1e-12) / 15).to(w.dtype).float()
            zero = (low + 8 * scale).to(w.dtype).float()
            q = ((chunk - (zero - 8 * scale)[..., None]) / scale[..., None]).round().clamp(0, 15)
            packed.append(torch._convert_weight_to_int4pack_for_cpu(q.view(chunk.size(0), -1).to(torch.int32), 2))
            scale_and_zero.append(torch.stack([scale, zero], dim=2).to(w.dtype))  # (rows, groups, 2)
        self.weight = nn.Parameter(torch.cat(packed), requires_grad=False)  # (out, in / 2) uint8, two per byte
        # (groups, out, 2), the kernel's order; cast with the model's dtype
        self.scale_and_zero = nn.Parameter(torch.cat(scale_and_zero).transpose(0, 1).contiguous(), requires_grad=False)
        self.bias = linear.bias

    @staticmethod
    def takes(linear, group=INT4_GROUP):
        """Whether the kernel takes this Linear's shape: rows a multiple of 16, columns of the group."""
        return linear.out_features % 16 == 0 and linear.in_features % group == 0

    def forward(self, x):
        rows = x.reshape(-1, x.size(-1)).contiguous()  # the kernel takes contiguous rows (the head reads x[:, -1])
        y = torch._weight_int4pack_mm_for_cpu(rows, self.weight, self.group, self.scale_and_zero.to(x.dtype))
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def release_freed_memory():
    """Hand memory freed inside the C heap back to the system where the C library can (glibc's malloc_trim; a
    no-op elsewhere). Weights of a few MB each come from glibc's heap once it has raised its mmap threshold, and
    freeing them leaves holes it keeps: without this, the process would go on holding most of the full-precision
    weights that quantize_int8 just dropped."""
    import ctypes
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): its allocator decides alone
        pass


def swap_linears(model, make_layer):
    """Replace the blocks' Linears and the head by make_layer(linear), in place, LoRA adapters merged first; each
    Linear's full-precision weights are dropped as soon as its copy exists (model.swap_modules)."""
    return swap_modules(merge_lora(model), lambda name, m: type(m) is nn.Linear, make_layer)


def quantize_int8(model):
    """Turn the blocks' Linears and the head into Int8Linears, in place, for talking to the model (sample.py,
    its chat and server, test-set responses, train.py --eval_only=True); never for training. Returns model."""
    swap_linears(model, Int8Linear)
    # A tied embedding (GPT-2, Llama 3.2 1B, Qwen3-0.6B) reads the head's int8 rows, dequantized per lookup,
    # rather than keeping its own full-precision rows: a lookup reads a few rows (nothing next to a token's
    # matmuls), while full-precision rows would be the largest tensor left in memory (Qwen3-0.6B: 311 MB of
    # bf16 beside 600 MB of int8 in all). The cost, the head's rounding on the input embeddings, is inside
    # the logit tolerance the tests hold. An untied embedding keeps its full-precision rows.
    if model.config.tie_embeddings:
        model.transformer.wte = Int8Embedding(model.lm_head.weight, model.lm_head.scale)
    release_freed_memory()
    return model.requires_grad_(False)  # the norms and biases too: a quantized model is for talking, never trained


def quantize_int4(model):
    """As quantize_int8, with Int4Linears (CPU only) wherever the kernel takes the shape, Int8Linears elsewhere
    (an unpadded GPT-2 head: 50,257 rows). A tied embedding gets int8 rows of its own, for the same reason as
    in quantize_int8 (the head's packed int4 rows cannot be looked up). Returns model."""
    swap_linears(model, lambda linear: Int4Linear(linear) if Int4Linear.takes(linear) else Int8Linear(linear))
    if model.config.tie_embeddings:
        rows = quantize_rows(model.transformer.wte.weight.detach())
        weight, scale = (nn.Parameter(t, requires_grad=False) for t in rows)
        model.transformer.wte = Int8Embedding(weight, scale)
    release_freed_memory()
    return model.requires_grad_(False)


QUANTIZERS = {'int8': quantize_int8, 'int4': quantize_int4}  # --quantize's schemes


def talk_dtype(scheme, device_type, dtype):
    """The dtype a model talks in with --quantize=scheme: on a CPU bfloat16, the only activations PyTorch's int8
    kernel vectorises there (in float32 it is slower than bfloat16 weights); elsewhere dtype. ValueError for an
    unknown scheme, or int4 off a CPU."""
    if scheme != 'none' and scheme not in QUANTIZERS:
        raise ValueError(f"--quantize={scheme}: use none, int8 or int4")
    if scheme == 'int4' and device_type != 'cpu':
        raise ValueError(f"--quantize=int4 runs on a CPU only (PyTorch's int4 kernel for CPUs); on {device_type} "
                         "use --quantize=int8")
    return 'bfloat16' if scheme != 'none' and device_type == 'cpu' else dtype


def cast_and_quantize(model, scheme, device_type, dtype):
    """The model as every script talks with it, in place: cast to talk_dtype, then quantized by scheme ('none'
    casts only). Cast first, so the scales are rounded to the dtype they are stored in; on the CPU, before a
    move to the device, so each Linear's full-precision weights are freed as its copy is made. Returns model."""
    model.to(dtype=getattr(torch, talk_dtype(scheme, device_type, dtype)))
    return QUANTIZERS[scheme](model) if scheme != 'none' else model
