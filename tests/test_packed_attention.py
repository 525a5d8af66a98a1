"""Packed (varlen) attention: the unpadded shared-query path and the padding helpers.

The CPU ``auto``/``sdpa`` path of :func:`shared_query_attention` runs one SDPA per cell on views
of the packed keys; ``reference`` pads and runs the explicit fp32 softmax. They must agree in
outputs and in gradients for any cell lengths.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasldm.models import attention as attn_mod
from atlasldm.models.attention import (
    CrossAttention,
    pad_packed,
    reference_attention,
    shared_query_attention,
    varlen_attention,
)
from atlasldm.models.layers import CrossAttentionBlock

TOL = {"atol": 1e-5, "rtol": 1e-5}
# one cell, length-1 cells, and very unequal lengths are all in range
LENGTHS = st.lists(st.integers(1, 64), min_size=1, max_size=8) | st.sampled_from(
    [[1], [1, 1, 1], [1, 200], [300, 1, 2], [57]]
)
SHAPES = st.tuples(st.sampled_from([1, 2, 4]), st.sampled_from([1, 3, 16]), st.sampled_from([4, 8]))


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _inputs(lengths: list[int], H: int, M: int, Dh: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(H, M, Dh, generator=g)
    k, v = torch.randn(2, sum(lengths), H, Dh, generator=g).unbind(0)
    return q, k, v, _cu(lengths)


def _run(q, k, v, lengths, backend, grad_out=None):
    """Output (N, M, H, Dh) and, with grad_out, the gradients w.r.t. q, k, v."""
    q, k, v = (t.detach().clone().requires_grad_(grad_out is not None) for t in (q, k, v))
    out = shared_query_attention(q, k, v, _cu(lengths), max(lengths), backend)
    if grad_out is None:
        return out.detach(), None
    out.backward(grad_out)
    return out.detach(), [t.grad for t in (q, k, v)]


@settings(max_examples=40, deadline=None)
@given(lengths=LENGTHS, shape=SHAPES, seed=st.integers(0, 2**16))
def test_unpadded_equals_padded_reference_outputs_and_gradients(lengths, shape, seed):
    H, M, Dh = shape
    q, k, v, _ = _inputs(lengths, H, M, Dh, seed)
    grad_out = torch.randn(len(lengths), M, H, Dh, generator=torch.Generator().manual_seed(seed))
    for backend in ("auto", "sdpa"):
        out, grads = _run(q, k, v, lengths, backend, grad_out)
        ref, ref_grads = _run(q, k, v, lengths, "reference", grad_out)
        torch.testing.assert_close(out, ref, **TOL)
        for name, g, r in zip("qkv", grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, **TOL, msg=lambda m, n=name: f"grad {n}: {m}")


@settings(max_examples=25, deadline=None)
@given(lengths=LENGTHS, data=st.data())
def test_permuting_cells_permutes_outputs(lengths, data):
    q, k, v, cu = _inputs(lengths, 2, 3, 4)
    perm = data.draw(st.permutations(range(len(lengths))))
    k_cells = [k[cu[i] : cu[i + 1]] for i in range(len(lengths))]
    v_cells = [v[cu[i] : cu[i + 1]] for i in range(len(lengths))]
    k_perm, v_perm = (torch.cat([cells[i] for i in perm]) for cells in (k_cells, v_cells))
    out = _run(q, k, v, lengths, "auto")[0]
    out_perm = _run(q, k_perm, v_perm, [lengths[i] for i in perm], "auto")[0]
    torch.testing.assert_close(out_perm, out[list(perm)], atol=0, rtol=0)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=2, max_size=6), data=st.data())
def test_a_cell_ignores_other_cells_tokens(lengths, data):
    q, k, v, cu = _inputs(lengths, 2, 3, 4)
    cell = data.draw(st.integers(0, len(lengths) - 1))
    other = torch.ones(k.shape[0], dtype=torch.bool)
    other[cu[cell] : cu[cell + 1]] = False
    k2, v2 = k.clone(), v.clone()
    k2[other], v2[other] = 50.0, -50.0  # garbage everywhere but in the cell
    out, out2 = _run(q, k, v, lengths, "auto")[0], _run(q, k2, v2, lengths, "auto")[0]
    torch.testing.assert_close(out2[cell], out[cell], atol=0, rtol=0)
    others = [i for i in range(len(lengths)) if i != cell]
    assert not torch.allclose(out2[others], out[others])  # the garbage did reach the others


def test_matches_a_per_cell_oracle_and_an_empty_cell_shifts_nothing():
    lengths = [5, 0, 1, 9]
    q, k, v, cu = _inputs(lengths, 4, 16, 8)
    out = shared_query_attention(q, k, v, cu, max(lengths), "auto")  # (N, M, H, Dh)
    for i, n in enumerate(lengths):
        if n == 0:  # no keys: undefined (module docstring); the others must not move
            continue
        ks, vs = (t[cu[i] : cu[i + 1]].transpose(0, 1)[None] for t in (k, v))
        want = reference_attention(q[None], ks, vs)[0].transpose(0, 1)  # (M, H, Dh)
        torch.testing.assert_close(out[i], want, **TOL)


def test_cpu_auto_and_sdpa_never_pad(monkeypatch):
    def no_padding(*args, **kwargs):
        raise AssertionError("the shared-query CPU path padded its keys")

    monkeypatch.setattr(attn_mod, "scatter_rows", no_padding)
    q, k, v, cu = _inputs([3, 7, 1], 2, 3, 4)
    for backend in ("auto", "sdpa"):
        assert shared_query_attention(q, k, v, cu, 7, backend).shape == (3, 3, 2, 4)
    with pytest.raises(AssertionError, match="padded"):  # the reference keeps the padded path
        shared_query_attention(q, k, v, cu, 7, "reference")


def test_mcab_block_compiles_to_one_graph_and_matches_eager():
    """Under torch.compile the padded path is traced: no graph break on the cell lengths."""
    torch.manual_seed(0)
    block = CrossAttentionBlock(32, 4, num_inducing_points=16)
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    for lengths in ([3, 9, 1], [5, 5, 12, 2]):
        kv, cu = torch.randn(sum(lengths), 32), _cu(lengths)
        got = compiled(kv, cu_seqlens_k=cu, max_seqlen_k=max(lengths))
        torch.testing.assert_close(got, block(kv, cu_seqlens_k=cu), **TOL)


def test_mcab_block_packed_auto_equals_reference_and_padded():
    torch.manual_seed(0)
    block = CrossAttentionBlock(32, 4, num_inducing_points=16)
    lengths = [1, 30, 7, 64]
    kv = torch.randn(sum(lengths), 32)
    cu = _cu(lengths)
    out = block(kv, cu_seqlens_k=cu)  # auto
    block.attn.backend = "reference"
    ref = block(kv, cu_seqlens_k=cu)
    block.attn.backend = "auto"
    padded, mask = pad_packed(kv, cu, max(lengths))
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(block(padded, key_padding_mask=mask), out, **TOL)


def test_bf16_autocast_on_cpu_stays_close():
    torch.manual_seed(0)
    ca = CrossAttention(32, 4)
    lengths = [40, 3, 120]
    kv, q = torch.randn(sum(lengths), 32), torch.randn(1, 16, 32)
    ref = ca(q, kv, cu_seqlens_k=_cu(lengths))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = ca(q, kv, cu_seqlens_k=_cu(lengths))
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), ref, atol=5e-2, rtol=5e-2)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(0, 12), min_size=1, max_size=6), extra=st.integers(0, 3))
def test_pad_packed_places_every_row_and_zeros_the_rest(lengths, extra):
    x = torch.arange(1.0, 2 * sum(lengths) + 1).view(-1, 2)  # (T, 2), no zero row
    max_len = max(lengths) + extra
    padded, mask = pad_packed(x, _cu(lengths), max_len)
    assert padded.shape == (len(lengths), max_len, 2)
    assert mask.tolist() == [[j < n for j in range(max_len)] for n in lengths]  # left-aligned
    torch.testing.assert_close(padded[mask], x, atol=0, rtol=0)
    assert not padded[~mask].any()


def test_pad_packed_rejects_a_short_max_len_and_a_wrong_total():
    x = torch.randn(7, 3)
    with pytest.raises(ValueError, match="shorter than the longest"):
        pad_packed(x, _cu([2, 5]), 4)
    with pytest.raises(ValueError, match="expected 7 packed rows"):
        pad_packed(x, _cu([2, 4]), 5)


@settings(max_examples=20, deadline=None)
@given(
    lq=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_varlen_sdpa_with_per_cell_queries_matches_an_oracle(lq, seed, data):
    lk = data.draw(st.lists(st.integers(1, 20), min_size=len(lq), max_size=len(lq)))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), 2, 4, generator=g)
    k, v = torch.randn(2, sum(lk), 2, 4, generator=g).unbind(0)
    cu_q, cu_k = _cu(lq), _cu(lk)
    out = varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), backend="sdpa")
    for i in range(len(lq)):  # per-sequence oracle
        qs, ks, vs = (
            t[c[i] : c[i + 1]].transpose(0, 1)[None] for t, c in ((q, cu_q), (k, cu_k), (v, cu_k))
        )
        want = reference_attention(qs, ks, vs)[0].transpose(0, 1)
        torch.testing.assert_close(out[cu_q[i] : cu_q[i + 1]], want, **TOL)
