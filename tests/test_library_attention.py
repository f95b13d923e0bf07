"""FlashAttention called directly (`flash_attn_func` and its packed forms) reads as SDPA: a model
calling it (diffusers' `"flash"` backend too) goes sparse and keeps the contract, the rewritten
graph computes what the call did, and calls SDPA does not compute the same are left alone.

flash-attn cannot be installed here (it builds against CUDA). This module stands in for its
registration: an op of its namespace, name and schema (`flash_attn::_flash_attn_forward`, as
flash-attn >= 2.7 registers it), computed on the CPU, and functions that reach it as flash-attn's
own do, through an autograd.Function that pads the head dim to a multiple of 8 and slices the
output back.
"""

import importlib.util
import math
from typing import Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from astraea.passes.library_attention import attention_from_library_ops
from tests.contract import check_sparse_model
from tests.generated import BlockStack, stack_inputs
from tests.graphs import graph_of

if importlib.util.find_spec("flash_attn") is not None:  # its own op would take the name, and runs on CUDA only
    pytest.skip("flash-attn is installed: this module stands in for it where it is not", allow_module_level=True)

if not hasattr(torch.ops.flash_attn, "_flash_attn_forward"):  # once per process

    @torch.library.custom_op("flash_attn::_flash_attn_forward", mutates_args=())
    def _flash_attn_forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, softmax_scale: float, causal: bool,
        window_size_left: int, window_size_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor],
        return_softmax: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """flash-attn's semantics on [B, N, H, D]: key/value heads shared by consecutive query
        heads, causal masks and windows aligned to the bottom right (ALiBi not modelled)."""
        dtype, (q, k, v) = q.dtype, (t.transpose(1, 2).float() for t in (q, k, v))
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
        scores = q @ k.mT * softmax_scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(q.shape[2])[:, None] + k.shape[2] - q.shape[2]
        j = torch.arange(k.shape[2])
        left = window_size_left if window_size_left >= 0 else math.inf
        right = 0 if causal else window_size_right if window_size_right >= 0 else math.inf
        scores = scores.masked_fill((j < i - left) | (j > i + right), -math.inf)
        probs = F.dropout(scores.softmax(-1), dropout_p)
        out = (probs @ v).transpose(1, 2).to(dtype).contiguous()
        probs = probs.to(dtype) if return_softmax else q.new_empty(0)
        return out, scores.logsumexp(-1), probs, torch.zeros(2, dtype=torch.int64)

    @_flash_attn_forward.register_fake
    def _(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap, alibi_slopes,
          return_softmax):
        b, n, h, _ = q.shape
        probs = q.new_empty(b, h, n, k.shape[1]) if return_softmax else q.new_empty(0)
        return torch.empty_like(q), q.new_empty(b, h, n, dtype=torch.float32), probs, q.new_empty(2, dtype=torch.int64)


class _FlashAttnFunc(torch.autograd.Function):
    """flash-attn's `FlashAttnFunc` forward (inference only)."""

    @staticmethod
    def forward(ctx, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, return_softmax):
        if softmax_scale is None:
            softmax_scale = q.shape[-1] ** (-0.5)
        head_size_og = q.size(3)
        if head_size_og % 8 != 0:
            q, k, v = (F.pad(t, [0, 8 - head_size_og % 8]) for t in (q, k, v))
        out_padded, softmax_lse, S_dmask, rng_state = torch.ops.flash_attn._flash_attn_forward(
            q, k, v, dropout_p, softmax_scale, causal=causal, window_size_left=window_size[0],
            window_size_right=window_size[1], softcap=softcap, alibi_slopes=None,
            return_softmax=return_softmax and dropout_p > 0,
        )
        out = out_padded[..., :head_size_og]
        return out if not return_softmax else (out, softmax_lse, S_dmask)

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    return_attn_probs=False):
    return _FlashAttnFunc.apply(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, return_attn_probs)


def flash_attn_kvpacked_func(q, kv):
    """As flash-attn's: its autograd.Function takes k and v as `kv[:, :, 0].detach()` and
    `kv[:, :, 1].detach()`, then runs as `FlashAttnFunc`'s."""
    return flash_attn_func(q, kv[:, :, 0].detach(), kv[:, :, 1].detach())


def flash_attn_qkvpacked_func(qkv):
    return flash_attn_func(*(qkv[:, :, i].detach() for i in range(3)))


class _Attention(nn.Module):
    """Self-attention on [B, N, H, D] through one of flash-attn's functions, as Open-Sora's blocks
    call them; `kv_heads` fewer than `heads`: grouped-query attention."""

    def __init__(self, width, heads, kv_heads, form):
        super().__init__()
        self.heads, self.kv_heads, self.form = heads, kv_heads, form
        self.q, self.out = nn.Linear(width, width), nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width * kv_heads // heads)

    def forward(self, x):
        b, n, w = x.shape
        q, kv = self.q(x).view(b, n, self.heads, -1), self.kv(x).view(b, n, 2, self.kv_heads, -1)
        if self.form == "func":
            o = flash_attn_func(q, kv[:, :, 0], kv[:, :, 1])
        elif self.form == "kvpacked":
            o = flash_attn_kvpacked_func(q, kv)
        else:
            o = flash_attn_qkvpacked_func(torch.cat([q[:, :, None], kv], 2))
        return self.out(o.reshape(b, n, w))


class _Block(nn.Module):
    def __init__(self, width, heads, kv_heads, form):
        super().__init__()
        self.attn = _Attention(width, heads, kv_heads, form)
        self.mlp, self.mod = nn.Linear(width, width), nn.Linear(width, 2 * width)

    def forward(self, x, temb):
        scale, shift = self.mod(temb)[:, None].chunk(2, dim=-1)
        x = x + self.attn(x * (1 + scale) + shift)
        return x + self.mlp(x)


@pytest.mark.parametrize("form, width, heads, kv_heads", [
    ("func", 16, 2, 2),
    ("func", 12, 2, 2),  # head dim 6: padded to 8 around the op, sliced back after it
    ("qkvpacked", 16, 2, 2),
    ("kvpacked", 32, 4, 2),  # grouped-query: two key/value heads, each shared by two query heads
])
def test_a_dit_calling_flash_attention_goes_sparse_and_keeps_the_contract(form, width, heads, kv_heads):
    """Every block sparse, exact at budget 1.0, the contract below 1 (without the pass: `0 of 0
    blocks sparse`, no attention op found)."""
    torch.manual_seed(0)
    blocks = [_Block(width, heads, kv_heads, form) for _ in range(2)]
    check_sparse_model(BlockStack(blocks, width).eval(), stack_inputs(10), 2)


def _inputs(heads=4, kv_heads=4, head_dim=8, kv_tokens=6):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 6, heads, head_dim, generator=g),
            *(torch.randn(2, kv_tokens, kv_heads, head_dim, generator=g) for _ in range(2)))


REWRITTEN = {  # form: (attention on q, k, v, the inputs)
    "plain": (flash_attn_func, _inputs()),
    "padded_head_dim": (flash_attn_func, _inputs(head_dim=6)),
    "scaled_causal": (lambda q, k, v: flash_attn_func(q, k, v, softmax_scale=0.2, causal=True), _inputs()),
    "grouped_query": (flash_attn_func, _inputs(kv_heads=2)),
    "cross": (flash_attn_func, _inputs(kv_tokens=5)),  # keys and values of other tokens (text)
    "by_overload_and_position": (  # the op called as `.default`, every argument by position
        lambda q, k, v: torch.ops.flash_attn._flash_attn_forward.default(
            q, k, v, 0.0, 0.3, False, -1, -1, 0.0, None, False)[0],
        _inputs(),
    ),
}


@pytest.mark.parametrize("form", REWRITTEN)
def test_the_rewritten_graph_computes_what_flash_attention_did(form):
    attention, inputs = REWRITTEN[form]

    def f(q, k, v):
        o = attention(q, k, v)
        # a view, as flash-attn's output is contiguous (unless sliced back from a padded head dim)
        return o.flatten(2) if form == "padded_head_dim" else o.view(*o.shape[:2], -1)

    gm = graph_of(f, *inputs)
    assert attention_from_library_ops(gm) == 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert F.scaled_dot_product_attention in targets and not any("flash_attn" in str(t) for t in targets)
    with sdpa_kernel(SDPBackend.MATH):  # its output is laid out heads first: the view needs `contiguous`
        (out,) = gm(*inputs)
    torch.testing.assert_close(out, f(*inputs), rtol=1e-5, atol=1e-5)


LEFT_ALONE = {  # form: (attention on q, k, v, the inputs)
    "dropout": (lambda q, k, v: flash_attn_func(q, k, v, dropout_p=0.1), _inputs()),
    "window": (lambda q, k, v: flash_attn_func(q, k, v, window_size=(2, 2)), _inputs()),
    "softcap": (lambda q, k, v: flash_attn_func(q, k, v, softcap=5.0), _inputs()),
    "softmax_statistics_read": (lambda q, k, v: flash_attn_func(q, k, v, return_attn_probs=True)[:2], _inputs()),
    "causal_of_unequal_lengths": (lambda q, k, v: flash_attn_func(q, k, v, causal=True), _inputs(kv_tokens=5)),
}


@pytest.mark.parametrize("form", LEFT_ALONE)
def test_calls_sdpa_does_not_compute_the_same_are_left_alone(form):
    attention, inputs = LEFT_ALONE[form]
    gm = graph_of(attention, *inputs)
    before = str(gm.graph)
    assert "flash_attn" in before
    assert attention_from_library_ops(gm) == 0 and str(gm.graph) == before


def test_diffusers_flash_backend_goes_sparse_and_keeps_the_contract(monkeypatch):
    """diffusers' `"flash"` attention backend calls `flash_attn_func` (here the stand-in's): its
    Wan goes sparse, self- and cross-attention read as SDPA."""
    import diffusers.models.attention_dispatch as dispatch
    from tests.support_models import wan

    monkeypatch.setattr(dispatch, "_CAN_USE_FLASH_ATTN", True)  # as where flash-attn is installed
    monkeypatch.setattr(dispatch, "flash_attn_func", flash_attn_func)
    # set_attention_backend also makes "flash" every model's default, process-wide: restored after
    registry = dispatch._AttentionBackendRegistry
    monkeypatch.setattr(registry, "_active_backend", registry._active_backend)
    family = wan()
    family.model.set_attention_backend("flash")
    g = torch.Generator().manual_seed(1)
    latents = [torch.randn(family.latent_shape, generator=g) for _ in range(3)]
    text = family.conditions[0]

    def inputs(step):  # hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image, return_dict
        return latents[step], torch.tensor([900.0 - 300 * step]), text, None, False

    check_sparse_model(family.model, inputs, 2)
