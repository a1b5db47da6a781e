"""replicas.sampling_kernels.fused_sample: the one-pass Triton sampler against its torch reference on the same
random numbers, greedy rows, padded and strided logits, determinism per (seed, offset), and sampled
frequencies against softmax(x / T).

Runs on CUDA (tests marked gpu), or on the CPU under Triton's interpreter:
    TRITON_INTERPRET=1 python -m pytest -q tests/test_sampling_kernels.py
Without triton (the CPU CI) the module is skipped.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("triton")

from replicas.sampling_kernels import (  # noqa: E402
    GROUPS_PER_SPLIT, RNG_GROUP, draw_uniforms, fused_sample, reference_sample, reference_scores)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(INTERPRET, reason="the interpreter runs on CPU tensors")]),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def _rows(n, device, seed=0, greedy_every=0, temps=(0.5, 0.8, 1.0, 1.7)):
    gen = torch.Generator().manual_seed(seed)
    temperature = torch.tensor([temps[i % len(temps)] for i in range(n)], dtype=torch.float32)
    if greedy_every:
        temperature[::greedy_every] = 0.0
    seeds = torch.randint(-2**62, 2**62, (n,), generator=gen, dtype=torch.int64)
    offsets = torch.randint(0, 2**40, (n,), generator=gen, dtype=torch.int64)
    return temperature.to(device), seeds.to(device), offsets.to(device)


def _check_against_reference(logits, vocab, temperature, seeds, offsets, max_near_ties=2):
    """Tokens equal the reference's, except where the reference itself has a near tie between the two
    (fp32 rounding of x / T or of the logs may differ by an ulp); logprobs within 1e-5 of log_softmax."""
    tokens, logprobs = fused_sample(logits, vocab, temperature, seeds, offsets)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert tokens.shape == logprobs.shape == (logits.shape[0],)
    uniforms = draw_uniforms(seeds, offsets, vocab)
    ref_tokens, _ = reference_sample(logits, vocab, temperature, seeds, offsets, uniforms)
    scores = reference_scores(logits, vocab, temperature, uniforms)
    tokens, ref_tokens = tokens.cpu(), ref_tokens.cpu()
    assert ((tokens >= 0) & (tokens < vocab)).all()
    differ = (tokens != ref_tokens).nonzero().flatten().tolist()
    for i in differ:
        a, b = scores[i, tokens[i]].item(), scores[i, ref_tokens[i]].item()
        assert abs(a - b) <= 1e-5 * (1 + abs(b)), f"row {i}: token {tokens[i]} ({a}) vs reference {ref_tokens[i]} ({b})"
    assert len(differ) <= max_near_ties, differ
    raw = torch.log_softmax(logits[:, :vocab].float(), dim=-1).cpu()
    expected = raw.gather(1, tokens.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(logprobs.cpu(), expected, atol=1e-5, rtol=1e-6)
    return tokens, logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference_padded_strided(device, dtype):
    """Mixed greedy and sampled rows; only the first `vocab` of V' columns count (the padding holds huge
    values); rows of a wider buffer, so the row stride exceeds V'; vocab not a multiple of RNG_GROUP."""
    # under the interpreter (about a second a program): 2 splits of a row (GROUPS_PER_SPLIT groups each)
    n, vocab = (3, (GROUPS_PER_SPLIT + 1) * RNG_GROUP + 123) if device.type == "cpu" else (256, 128256)
    padded, width = vocab + 64, vocab + 200
    gen = torch.Generator().manual_seed(1)
    buf = (torch.randn(n, width, generator=gen) * 3).to(dtype)
    buf[:, vocab:] = 1e4 if dtype != torch.float16 else 6e4
    logits = buf.to(device)[:, :padded]
    assert logits.stride(0) == width and not logits.is_contiguous()
    temperature, seeds, offsets = _rows(n, device, seed=2, greedy_every=2)
    tokens, _ = _check_against_reference(logits, vocab, temperature, seeds, offsets)
    greedy = (temperature < 1e-5).cpu()
    assert torch.equal(tokens[greedy], logits[:, :vocab].float().argmax(-1).cpu()[greedy])


def test_greedy_argmax_and_ties(device):
    """Greedy rows: the argmax of the raw logits, the lowest column on ties (like torch.argmax), found in any
    column group and lane; temperature 1e-6 is greedy too."""
    vocab = 2 * RNG_GROUP + 7
    cols = [0, 5, RNG_GROUP // 4 + 3, RNG_GROUP - 1, RNG_GROUP, RNG_GROUP + 700, 2 * RNG_GROUP + 6]
    logits = torch.randn(len(cols) + 2, vocab, generator=torch.Generator().manual_seed(3))
    for i, c in enumerate(cols):
        logits[i, c] = 50.0
    logits[len(cols)] = 1.0                              # all equal: column 0
    logits[len(cols) + 1, [9, RNG_GROUP + 1, 2 * RNG_GROUP + 2]] = 50.0   # three-way tie across groups
    n = logits.shape[0]
    temperature = torch.zeros(n)
    temperature[1] = 1e-6
    seeds, offsets = torch.arange(n), torch.arange(n) * 11
    tokens, logprobs = fused_sample(logits.to(device), vocab, temperature.to(device), seeds.to(device),
                                    offsets.to(device))
    assert tokens.cpu().tolist() == cols + [0, 9]
    expected = torch.log_softmax(logits, -1).gather(1, tokens.cpu().unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(logprobs.cpu(), expected, atol=1e-5, rtol=1e-6)


def test_masked_columns_and_tiny_vocab(device):
    """-inf logits (masked tokens) never win and don't disturb the normaliser; vocab 1 gives token 0, logprob 0."""
    vocab = RNG_GROUP + 300
    logits = torch.full((4, vocab), float("-inf"))
    logits[:, [3, 700, RNG_GROUP + 299]] = torch.tensor([1.0, 2.0, 3.0])
    temperature = torch.tensor([1.0, 0.0, 5.0, 0.3])
    seeds, offsets = torch.arange(4) + 100, torch.arange(4)
    tokens, logprobs = _check_against_reference(logits.to(device), vocab, temperature.to(device),
                                                seeds.to(device), offsets.to(device), max_near_ties=0)
    assert set(tokens.tolist()) <= {3, 700, RNG_GROUP + 299}
    assert tokens[1].item() == RNG_GROUP + 299
    one = torch.tensor([[0.25, 9.0]], device=device)
    tok, lp = fused_sample(one, 1, torch.tensor([1.0], device=device), seeds[:1].to(device), offsets[:1].to(device))
    assert tok.item() == 0 and abs(lp.item()) < 1e-6


def test_determinism_independent_of_row_and_batch(device):
    """A row's draw depends only on (seed, offset): the same token whatever row index it has and whatever
    else is in the batch; repeated calls agree; another offset or seed draws differently."""
    vocab = RNG_GROUP + 1000
    gen = torch.Generator().manual_seed(4)
    n = 8 if device.type == "cuda" else 4
    logits = torch.randn(n, vocab, generator=gen) * 0.1   # flat: the draw decides the token
    temperature, seeds, offsets = _rows(n, torch.device("cpu"), seed=5)
    to = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    first, lp_first = fused_sample(*to(logits), vocab, *to(temperature, seeds, offsets))
    again, lp_again = fused_sample(*to(logits), vocab, *to(temperature, seeds, offsets))
    assert torch.equal(first, again) and torch.equal(lp_first, lp_again)
    perm = torch.randperm(n, generator=gen)
    other = torch.randn(3, vocab, generator=gen)
    mixed_logits = torch.cat([other, logits[perm]])
    mixed_t = torch.cat([torch.tensor([1.0, 0.0, 2.0]), temperature[perm]])
    mixed_s = torch.cat([torch.tensor([1, 2, 3]), seeds[perm]])
    mixed_o = torch.cat([torch.tensor([7, 8, 9]), offsets[perm]])
    mixed, lp_mixed = fused_sample(*to(mixed_logits), vocab, *to(mixed_t, mixed_s, mixed_o))
    assert torch.equal(mixed[3:].cpu(), first.cpu()[perm])
    torch.testing.assert_close(lp_mixed[3:].cpu(), lp_first.cpu()[perm], atol=0, rtol=0)
    for i in range(n if device.type == "cuda" else 2):
        alone, _ = fused_sample(*to(logits[i:i + 1]), vocab, *to(temperature[i:i + 1], seeds[i:i + 1],
                                                                    offsets[i:i + 1]))
        assert alone.item() == first[i].item()
    moved, _ = fused_sample(*to(logits), vocab, *to(temperature, seeds, offsets + 1))
    reseeded, _ = fused_sample(*to(logits), vocab, *to(temperature, seeds + 1, offsets))
    assert not torch.equal(moved.cpu(), first.cpu()) and not torch.equal(reseeded.cpu(), first.cpu())


def test_uniforms_full_width_counters(device):
    """The uniforms: in (0, 1), mean 1/2, independent of the batch; offsets differing only above bit 32
    (or by 2**32 exactly) and seeds differing only in their high half draw different numbers."""
    vocab = RNG_GROUP + 5
    seeds = torch.tensor([7, 7, 7, 7 + 2**40, 7, -1], device=device)
    offsets = torch.tensor([3, 3 + 2**32, 3 + 2**40, 3, 2**63 - 1, 0], device=device)
    u = draw_uniforms(seeds, offsets, vocab).cpu()
    assert u.shape == (6, vocab) and u.dtype == torch.float32
    assert (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.01
    for i in range(1, 6):
        assert (u[i] != u[0]).float().mean() > 0.99, i
    assert torch.equal(draw_uniforms(seeds[2:3], offsets[2:3], vocab).cpu(), u[2:3])
    assert torch.equal(draw_uniforms(seeds, offsets, 17).cpu(), u[:, :17])


def _check_frequencies(tokens, x, temperature, n):
    counts = torch.bincount(tokens.cpu(), minlength=x.numel()).double()
    p = torch.softmax(x.double() / temperature, 0)
    se = (p * (1 - p) / n).sqrt()
    assert ((counts / n - p).abs() <= 4 * se).all(), ((counts / n).tolist(), p.tolist())
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum().item()
    assert chi2 < 30, chi2


X8 = torch.tensor([1.0, 0.5, 0.0, -0.3, 2.0, -1.0, 0.2, 1.4])


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="CUDA only")
@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_frequencies_match_softmax(temperature):
    """20000 draws (one seed, offsets 0..19999) over 8 tokens: each frequency within 4 standard errors of
    softmax(x / T), and a chi-square statistic (7 degrees of freedom) below 30 (p ~ 1e-4)."""
    n, vocab, dev = 20000, 8, torch.device("cuda")
    logits = X8.expand(n, vocab).contiguous().to(dev)
    seeds = torch.full((n,), 12345, dtype=torch.int64, device=dev)
    offsets = torch.arange(n, dtype=torch.int64, device=dev)
    tokens, logprobs = fused_sample(logits, vocab, torch.full((n,), temperature, device=dev), seeds, offsets)
    _check_frequencies(tokens, X8, temperature, n)
    torch.testing.assert_close(logprobs.cpu(), torch.log_softmax(X8, 0)[tokens.cpu()], atol=1e-5, rtol=1e-6)


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's stand-in for the CUDA frequency test")
@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_frequencies_of_the_race_on_drawn_uniforms(temperature):
    """The interpreter runs a program in about a second, too slow for 20000 draws of fused_sample: instead one
    wide draw (8 programs) gives 16384 uniforms, taken as 2048 draws of 8 columns, raced with the reference's
    score (which fused_sample matches token for token in the tests above); frequencies as on CUDA."""
    n = 2048
    u = draw_uniforms(torch.tensor([12345]), torch.tensor([0]), 8 * n).view(n, 8)
    tokens = reference_scores(X8.expand(n, 8), 8, torch.full((n,), temperature), u).argmax(-1)
    _check_frequencies(tokens, X8, temperature, n)


def test_rejects_bad_arguments(device):
    logits = torch.zeros(2, 10, device=device)
    t, s, o = torch.ones(2, device=device), torch.zeros(2, dtype=torch.int64, device=device), \
        torch.zeros(2, dtype=torch.int64, device=device)
    with pytest.raises(ValueError):
        fused_sample(logits, 11, t, s, o)
    with pytest.raises(ValueError):
        fused_sample(logits, 10, t.double(), s, o)
    with pytest.raises(ValueError):
        fused_sample(logits, 10, t, s.int(), o)
    with pytest.raises(ValueError):
        fused_sample(logits[0], 10, t, s, o)
    tokens, logprobs = fused_sample(logits[:0], 10, t[:0], s[:0], o[:0])
    assert tokens.shape == logprobs.shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="CUDA only")
def test_gpu_batch_of_256_bf16_statistics_per_row_position():
    """On the GPU at full size: [256, 128256] bf16; the empirical token distribution of 256 rows sharing
    logits (different offsets) over a small support follows softmax(x / T) whatever the row index."""
    n, vocab = 256, 128256
    dev = torch.device("cuda")
    logits = torch.full((n, vocab), -30.0, dtype=torch.bfloat16, device=dev)
    logits[:, [10, 70000, 128255]] = torch.tensor([0.0, 1.0, 0.5], dtype=torch.bfloat16, device=dev)
    temp = torch.full((n,), 1.0, device=dev)
    seeds = torch.full((n,), 99, dtype=torch.int64, device=dev)
    counts = torch.zeros(vocab, dtype=torch.float64)
    draws = 40
    for step in range(draws):
        offsets = torch.arange(n, dtype=torch.int64, device=dev) + step * n
        tokens, _ = fused_sample(logits, vocab, temp, seeds, offsets)
        counts += torch.bincount(tokens.cpu(), minlength=vocab).double()
    total = n * draws
    full = torch.log_softmax(logits[0].float(), 0).exp().double().cpu()
    support = [10, 70000, 128255]
    for c in support:
        se = math.sqrt(full[c] * (1 - full[c]) / total)
        assert abs(counts[c] / total - full[c]) <= 4 * se + 1e-9, (c, counts[c] / total, full[c].item())
