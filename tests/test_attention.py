"""Attention dispatch: backends agree, masked keys get zero weight, varlen == padded."""

from __future__ import annotations

import time

import pytest
import torch

from atlasldm.models import attention as attn_mod
from atlasldm.models.attention import (
    CrossAttention,
    SelfAttention,
    attention,
    pad_packed,
    reference_attention,
    varlen_attention,
)
from atlasldm.models.layers import Block, CrossAttentionBlock, SwiGLU, sincos_embedding_1d

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _qkv(B=3, H=2, Lq=4, Lk=7, Dh=8, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, Dh, generator=g) for L in (Lq, Lk, Lk))
    mask = torch.ones(B, Lk, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 1:3] = False  # a hole, not only a right-padded tail
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    return q, k, v, mask.to(device)


def _packed_from_padded(x, mask):
    """(B, L, H, Dh) + (B, L) mask -> packed (T, H, Dh), cu_seqlens (B+1,)."""
    lens = mask.sum(1)
    cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    return x[mask], cu


def test_sdpa_matches_reference_with_mask():
    q, k, v, mask = _qkv()
    out_sdpa = attention(q, k, v, key_padding_mask=mask, backend="sdpa")
    out_ref = attention(q, k, v, key_padding_mask=mask, backend="reference")
    out_auto = attention(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(out_sdpa, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_auto, out_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_masked_keys_get_zero_weight(backend):
    q, k, v, mask = _qkv()
    out = attention(q, k, v, key_padding_mask=mask, backend=backend)
    k2, v2 = k.clone(), v.clone()
    bad = ~mask[:, None, :, None].expand_as(k)
    k2[bad], v2[bad] = 1e3, -1e3  # garbage in the masked slots
    out2 = attention(q, k2, v2, key_padding_mask=mask, backend=backend)
    torch.testing.assert_close(out, out2, atol=1e-5, rtol=1e-5)
    # and equal to attending over the real keys only
    real = attention(q[1:2], k[1:2, :, :4], v[1:2, :, :4], backend=backend)
    torch.testing.assert_close(out[1:2], real, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_varlen_matches_padded(backend):
    q, k, v, mask = _qkv(Lq=5)
    B, H, Lq, Dh = q.shape
    qp = q.transpose(1, 2).reshape(B * Lq, H, Dh)  # (B*Lq, H, Dh)
    cu_q = torch.arange(B + 1, dtype=torch.int32) * Lq
    kp, cu_k = _packed_from_padded(k.transpose(1, 2), mask)
    vp, _ = _packed_from_padded(v.transpose(1, 2), mask)
    out = varlen_attention(qp, kp, vp, cu_q, cu_k, Lq, int(mask.sum(1).max()), backend=backend)
    ref = attention(q, k, v, key_padding_mask=mask, backend="sdpa")  # (B, H, Lq, Dh)
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(B * Lq, H, Dh), atol=1e-5, rtol=0)


def test_varlen_variable_query_lengths():
    g = torch.Generator().manual_seed(1)
    lq, lk = [2, 5, 1], [3, 1, 6]
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    q = torch.randn(sum(lq), 2, 4, generator=g)
    k, v = torch.randn(2, sum(lk), 2, 4, generator=g).unbind(0)
    out = varlen_attention(q, k, v, cu(lq), cu(lk), max(lq), max(lk), backend="reference")
    for i in range(3):  # per-sequence loop as the oracle
        qs = q[cu(lq)[i] : cu(lq)[i + 1]].transpose(0, 1)[None]
        ks = k[cu(lk)[i] : cu(lk)[i + 1]].transpose(0, 1)[None]
        vs = v[cu(lk)[i] : cu(lk)[i + 1]].transpose(0, 1)[None]
        want = reference_attention(qs, ks, vs)[0].transpose(0, 1)
        torch.testing.assert_close(out[cu(lq)[i] : cu(lq)[i + 1]], want, atol=1e-5, rtol=0)


def test_pad_packed_roundtrip():
    x = torch.arange(10.0)
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32)  # an empty sequence in the middle
    padded, mask = pad_packed(x, cu, 8)
    assert padded.shape == (3, 8) and mask.sum().item() == 10
    torch.testing.assert_close(padded[mask], x)


def test_cross_attention_packed_equals_padded_and_shared_queries():
    torch.manual_seed(0)
    ca = CrossAttention(16, 4)
    _, _, _, mask = _qkv()
    kv = torch.randn(3, 7, 16)
    q = torch.randn(1, 5, 16)  # shared by every item
    out_pad = ca(q, kv, key_padding_mask=mask)
    kvp, cu = _packed_from_padded(kv, mask)
    out_packed = ca(q, kvp, cu_seqlens_k=cu)
    torch.testing.assert_close(out_pad, out_packed, atol=1e-5, rtol=1e-5)
    out_expanded = ca(q.expand(3, -1, -1), kv, key_padding_mask=mask)
    torch.testing.assert_close(out_pad, out_expanded, atol=1e-6, rtol=1e-6)


def test_self_attention_and_block_shapes_and_mask():
    torch.manual_seed(0)
    sa, blk = SelfAttention(16, 4), Block(16, 4)
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    y = sa(x, mask)
    x2 = x.clone()
    x2[1, 4:] = 100.0
    torch.testing.assert_close(sa(x2, mask)[1, :4], y[1, :4], atol=1e-5, rtol=1e-5)
    assert blk(x).shape == (2, 6, 16)


def test_reference_parameterisation():
    """REF widths: SwiGLU hidden 88 at E=32; block / MCAB parameter counts of scLDM."""
    assert SwiGLU(32).w1.out_features == 88
    assert sum(p.numel() for p in Block(32, 8).parameters()) == 12_672
    assert sum(p.numel() for p in CrossAttentionBlock(32, 4, 16).parameters()) == 13_248
    assert sum(p.numel() for p in CrossAttentionBlock(32, 4).parameters()) == 12_736


def test_sincos_table():
    t = sincos_embedding_1d(16, 32)
    assert t.shape == (16, 32) and t.abs().sum() > 0
    torch.testing.assert_close(t[0], torch.cat([torch.zeros(16), torch.ones(16)]))


def test_unknown_or_missing_backend_raises():
    q, k, v, _ = _qkv()
    with pytest.raises(ValueError):
        attention(q, k, v, backend="nope")
    if attn_mod.flash_attn_varlen_func is None:
        with pytest.raises(RuntimeError):
            attention(q, k, v, backend="flash")


@pytest.mark.gpu
@gpu
def test_gpu_backends_agree():
    q, k, v, mask = _qkv(B=4, H=4, Lq=16, Lk=64, Dh=16, device="cuda", dtype=torch.bfloat16)
    ref = attention(q, k, v, key_padding_mask=mask, backend="reference").float()
    sdpa = attention(q, k, v, key_padding_mask=mask, backend="sdpa").float()
    torch.testing.assert_close(sdpa, ref, atol=2e-2, rtol=2e-2)
    if attn_mod.flash_available(q):
        flash = attention(q, k, v, key_padding_mask=mask, backend="flash").float()
        torch.testing.assert_close(flash, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@gpu
def test_gpu_varlen_speed(capsys):
    """Timing of the varlen paths (MCAB shape: 16 queries, ~2k keys per cell, 128 cells)."""
    torch.manual_seed(0)
    B, H, Dh, M = 128, 4, 8, 16
    lens = torch.randint(500, 4000, (B,))
    cu_k = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32).cuda()
    cu_q = (torch.arange(B + 1, dtype=torch.int32) * M).cuda()
    opts = {"device": "cuda", "dtype": torch.bfloat16}
    q = torch.randn(B * M, H, Dh, **opts)
    k, v = torch.randn(2, int(lens.sum()), H, Dh, **opts).unbind(0)
    backends = ["sdpa"] + (["flash"] if attn_mod.flash_available(q) else [])
    times = {}
    for backend in backends:
        for _ in range(3):
            varlen_attention(q, k, v, cu_q, cu_k, M, int(lens.max()), backend=backend)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            varlen_attention(q, k, v, cu_q, cu_k, M, int(lens.max()), backend=backend)
        torch.cuda.synchronize()
        times[backend] = (time.perf_counter() - t0) / 20 * 1e3
    with capsys.disabled():
        print(f"\nvarlen attention ms/call: {times}")
    assert all(t > 0 for t in times.values())
