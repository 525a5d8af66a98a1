"""Gene-sampled training decode (``VAEConfig.sampled_zeros``): exactness at k = G, unbiasedness."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasldm.models.batch import CellBatch
from atlasldm.models.sampled_decode import row_weights, sampled_nll
from atlasldm.models.vae import VAE, VAEConfig

G = 48


def cells(n: int, expressed: list[int], vocab: int = G, seed: int = 0) -> CellBatch:
    """Packed cells with the given numbers of distinct expressed genes, counts 1..9."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randperm(vocab, generator=g)[:s] + 1 for s in expressed[:n]])
    counts = torch.randint(1, 10, (ids.shape[0],), generator=g).float()
    cu = torch.tensor([0, *torch.tensor(expressed[:n]).cumsum(0).tolist()], dtype=torch.int32)
    return CellBatch.from_packed(ids, counts, cu)


def small_vae(**fields) -> VAE:
    torch.manual_seed(0)
    # Tiny, so hundreds of draws stay cheap; 20-gene chunks make every path cross chunk edges.
    shape = {"num_layers": 1, "embed_dim": 8, "num_heads": 4, "num_cross_heads": 2}
    shape |= {"num_latent_tokens": 4, "latent_dim": 4}
    cfg = VAEConfig(num_genes=G, decode_chunk=20, **shape, **fields)
    return VAE(cfg).train()


def flat_grads(model: VAE, batch: CellBatch, seed: int | None) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=False)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    out = model.loss(batch, generator=gen)
    out.total.backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return float(out.total.detach()), torch.cat(grads)


BATCH = cells(5, [3, 9, 17, 6, 12])


@pytest.mark.parametrize("likelihood", ["nb_shared_theta", "gaussian"])
@pytest.mark.parametrize("normaliser", ["estimated", "exact"])
def test_sampling_every_gene_trains_exactly_like_the_full_decode(normaliser, likelihood):
    """k = G: every gene sampled with weight 1, so three SGD steps match full training.

    SGD, not Adam: under the NB softmax the head bias has a true gradient of 0, and Adam would
    turn float noise there into full-size steps in both runs.
    """
    fields = {"likelihood": likelihood, "sampled_normaliser": normaliser}
    full, sampled = small_vae(**fields), small_vae(sampled_zeros=G, **fields)
    opts = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in (full, sampled)]
    for step in range(3):
        opts[0].zero_grad()
        full.loss(BATCH).total.backward()
        opts[0].step()
        opts[1].zero_grad()  # the sampled objective itself: `loss` would fall back at k = G
        gen = torch.Generator().manual_seed(step)
        sampled_nll(sampled, sampled.encode(BATCH), BATCH, gen).mean().backward()
        opts[1].step()
    for (name, a), b in zip(full.named_parameters(), sampled.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_exact_normaliser_value_is_the_full_nll_and_gradient_is_unbiased():
    """Mean of many k = 8 sampled gradients equals the full gradient within 4.5 standard errors."""
    full_loss, full_grad = flat_grads(small_vae(), BATCH, None)
    model = small_vae(sampled_zeros=8, sampled_normaliser="exact")
    draws = torch.stack([flat_grads(model, BATCH, seed)[1] for seed in range(300)])  # (N, P)
    assert flat_grads(model, BATCH, 999)[0] == pytest.approx(full_loss, rel=1e-6)
    directions = torch.randn(12, draws.shape[1], generator=torch.Generator().manual_seed(0))
    proj, target = draws @ directions.T, directions @ full_grad  # (N, 12), (12,)
    stderr = proj.std(dim=0) / proj.shape[0] ** 0.5
    assert (stderr > 0).all(), "sampling did not change the gradient: nothing was estimated"
    z = (proj.mean(dim=0) - target) / stderr
    assert z.abs().max() < 4.5, z


def test_estimated_normaliser_sum_is_unbiased_its_log_biased_low_and_shrinking_with_k():
    """S_hat is an unbiased sum; log S_hat is low on average (Jensen), less so as k grows."""
    logits = torch.randn(BATCH.num_cells, G, generator=torch.Generator().manual_seed(1)) * 2
    true_lse = torch.logsumexp(logits, dim=1)  # (B,)
    bias = {}
    for k in (4, 16, G):
        sums, logs = [], []
        for seed in range(3000 if k < G else 1):
            ids, weight = row_weights(BATCH, G, k, torch.Generator().manual_seed(seed))
            rows = logits.gather(1, ids - 1)  # (B, S + k)
            log_w = torch.where(weight > 0, weight.clamp_min(1e-30).log(), float("-inf"))
            logs.append(torch.logsumexp(rows + log_w, dim=1))
            sums.append(torch.exp(logs[-1] - true_lse))  # S_hat / S
        ratio, lse = torch.stack(sums), torch.stack(logs)
        if k < G:
            stderr = ratio.std(dim=0) / ratio.shape[0] ** 0.5
            assert ((ratio.mean(dim=0) - 1).abs() < 4.5 * stderr).all()  # unbiased sum
        bias[k] = (lse.mean(dim=0) - true_lse).mean().item()
    assert bias[4] < bias[16] < 0  # Jensen: low, and closer with more samples
    assert bias[G] == pytest.approx(0.0, abs=1e-5)  # every gene sampled: exact


def test_validation_and_no_grad_decode_every_gene():
    """Evaluation (eval mode or no grad) ignores sampled_zeros: the loss equals the full one."""
    full, sampled = small_vae(), small_vae(sampled_zeros=4)
    with torch.no_grad():
        assert float(sampled.loss(BATCH).total) == float(full.loss(BATCH).total)
    full.eval(), sampled.eval()
    assert float(sampled.loss(BATCH).total) == float(full.loss(BATCH).total)


def test_the_generator_decides_the_sample():
    """Same generator seed, same loss and gradient (resume); another seed, another sample."""
    model = small_vae(sampled_zeros=6)
    a, b, c = (flat_grads(model, BATCH, seed) for seed in (3, 3, 4))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_sampled_decode_runs_under_bf16_autocast():
    model = small_vae(sampled_zeros=10, sampled_normaliser="exact")
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loss, grad = flat_grads(model, BATCH, 0)
    assert torch.isfinite(torch.tensor(loss)) and torch.isfinite(grad).all()


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=6),
    k=st.integers(1, G),
    seed=st.integers(0, 2**16),
)
def test_row_weights_count_every_gene_once(lengths, k, seed):
    """Expressed genes weigh 1; each cell draws min(k, |U|) distinct unexpressed genes at |U|/k."""
    batch = cells(len(lengths), lengths, seed=seed)
    ids, weight = row_weights(batch, G, k, torch.Generator().manual_seed(seed))
    expressed = batch.dense_target_chunk(1, G + 1) > 0  # (B, G)
    S = int(batch.max_seqlen)
    for b, n in enumerate(lengths):
        real = weight[b, :S] > 0
        assert int(real.sum()) == n and float(weight[b, :S].sum()) == n
        assert expressed[b, ids[b, :S][real] - 1].all()
        drawn = ids[b, S:][weight[b, S:] > 0]
        unexpressed = G - n
        assert drawn.numel() == min(k, unexpressed) and drawn.unique().numel() == drawn.numel()
        assert not expressed[b, drawn - 1].any() and int(drawn.min()) >= 1
        expected = unexpressed / min(k, unexpressed)
        assert torch.allclose(weight[b, S:][weight[b, S:] > 0], torch.tensor(expected))


def test_draws_cover_every_unexpressed_gene_evenly():
    """Each unexpressed gene of a cell is drawn with probability k / |U| (the weights' premise)."""
    counts = torch.zeros(BATCH.num_cells, G + 1)
    for seed in range(600):
        ids, weight = row_weights(BATCH, G, 8, torch.Generator().manual_seed(seed))
        S = int(BATCH.max_seqlen)
        counts.scatter_add_(1, ids[:, S:], (weight[:, S:] > 0).float())
    expressed = BATCH.dense_target_chunk(1, G + 1) > 0
    for b in range(BATCH.num_cells):
        freq = counts[b, 1:][~expressed[b]] / 600  # (|U|,)
        p = 8 / int((~expressed[b]).sum())
        assert (freq - p).abs().max() < 5 * (p * (1 - p) / 600) ** 0.5
        assert counts[b, 1:][expressed[b]].sum() == 0


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 15), min_size=1, max_size=5), seed=st.integers(0, 999))
def test_per_cell_targets_and_membership_match_the_dense_counts(lengths, seed):
    batch = cells(len(lengths), lengths, seed=seed)
    dense = batch.dense_target_chunk(1, G + 1)  # (B, G)
    ids = torch.randint(1, G + 1, (len(lengths), 7), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(batch.dense_target_rows(ids), dense.gather(1, ids - 1))
    genes = torch.randperm(G, generator=torch.Generator().manual_seed(seed))[:9] + 1
    assert torch.equal(batch.membership(genes), dense[:, genes - 1] > 0)


def test_config_checks_the_new_fields():
    with pytest.raises(ValueError, match="sampled_normaliser"):
        VAEConfig(num_genes=5, sampled_normaliser="guess")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sampled_zeros"):
        VAEConfig(num_genes=5, sampled_zeros=-1)
    assert dataclasses.replace(VAEConfig(num_genes=5), sampled_zeros=3).sampled_zeros == 3


def test_the_full_decode_is_used_when_it_decodes_fewer_rows(monkeypatch):
    """Longest cell (17 genes) + k >= G: the sampled rows would outnumber G, so decode all."""
    import atlasldm.models.vae as vae_module

    calls = []
    monkeypatch.setattr(vae_module, "sampled_nll", lambda *a: calls.append(a) or 1 / 0)
    full, fallback = small_vae(), small_vae(sampled_zeros=G - 17)
    assert float(fallback.loss(BATCH).total) == float(full.loss(BATCH).total)
    assert not calls
    with pytest.raises(ZeroDivisionError):  # one gene fewer: the sampled decode runs
        small_vae(sampled_zeros=G - 18).loss(BATCH)
