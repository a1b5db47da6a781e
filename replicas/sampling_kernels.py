"""One fused Triton pass that samples a batch of decode rows (issue 6).

`fused_sample` reads each row of logits once (bf16/fp16/fp32): programs (row, split) each take 8192 columns
(GROUPS_PER_SPLIT column groups; the split depends on vocab_size only, never on the batch) and in one loop compute
  - the raw log-softmax normaliser (running max and sum of exp of the raw logits),
  - the exponential race / Gumbel-max winner argmax_j (x_j / T - log E_j), E_j ~ Exp(1),
    or, for a greedy row (T < 1e-5), argmax_j x_j,
  - the raw logit of the winner,
then a small second kernel merges a row's splits and returns the winner and its log-probability under
log_softmax(logits[:, :vocab_size]) (no temperature). Ties go to the lowest column, like torch.argmax.

Random numbers (the definition tests and `reference_sample` rely on):
  the draw of row i depends only on (seeds[i], offsets[i]) and the column j, never on the row
  index, the batch or the kernel's block size. Philox-4x32 (Triton's `tl.philox`, 10 rounds) is
  keyed by the 64-bit seed; its 128-bit counter is (c0, offset_lo32, offset_hi32, 0), so no
  offset up to 2**64 wraps. Columns come in groups of RNG_GROUP = 4 * RNG_LANES: column j has
  group g = j // RNG_GROUP, lane c = (j % RNG_GROUP) // RNG_LANES, k = j % RNG_LANES; it uses
  output c of philox with c0 = g * RNG_LANES + k (one philox call serves 4 columns, and each
  output lane reads a contiguous run of columns).
  From the 32-bit output r: v = min((r + 0.5) * 2**-32, 1 - 2**-24) in float32, uniform on (0, 1)
  and never 0 or 1; E = -log1p(-v). v is fine-grained near 0, which is where E is small and the
  column's score high, so the top of the Gumbel tail is not coarsely quantised.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

RNG_LANES = 512                # philox counters per column group
RNG_GROUP = 4 * RNG_LANES      # columns per group (4 philox outputs per counter)
GREEDY_EPS = 1e-5              # temperature below this: greedy row
GROUPS_PER_SPLIT = 4           # column groups per program: 8192 columns, 16 programs a row for vocab 128256
# lg2.approx (inline PTX) on the GPU; the interpreter has no PTX, so it takes tl.log2
_FAST_LOG = os.environ.get("TRITON_INTERPRET") != "1"
_TWO_POW_M32 = tl.constexpr(2.3283064365386963e-10)   # 2**-32
_V_MAX = tl.constexpr(0.99999994039535522)            # 1 - 2**-24, the largest float32 below 1


@triton.jit
def _uniforms4(seed, offset, group, LANES: tl.constexpr):
    """The four [LANES] blocks of v (uniform on (0, 1)) for column group `group` of draw (seed, offset)."""
    k = tl.arange(0, LANES)
    c0 = (group * LANES + k).to(tl.uint32)
    zero = tl.zeros([LANES], dtype=tl.uint32)
    off_lo = zero + (offset & 0xFFFFFFFF).to(tl.uint32)
    off_hi = zero + ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, off_lo, off_hi, zero)
    v0 = tl.minimum((r0.to(tl.float32) + 0.5) * _TWO_POW_M32, _V_MAX)
    v1 = tl.minimum((r1.to(tl.float32) + 0.5) * _TWO_POW_M32, _V_MAX)
    v2 = tl.minimum((r2.to(tl.float32) + 0.5) * _TWO_POW_M32, _V_MAX)
    v3 = tl.minimum((r3.to(tl.float32) + 0.5) * _TWO_POW_M32, _V_MAX)
    return v0, v1, v2, v3


@triton.jit
def _log2(x, FAST: tl.constexpr):
    if FAST:   # the MUFU instruction (rel. error ~2**-22); libdevice's log2f is a long polynomial
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _gumbel2(v, FAST: tl.constexpr):
    """-log2(-log2(1 - v)) = (-log E) * log2(e) - log2(ln 2) for E = -log1p(-v): the Gumbel noise in base 2, up to an
    additive constant no argmax sees. -log2(1 - v) by Kahan's log1p trick (w - 1 is exact for w = 1 - v), so a
    tiny v keeps its precision."""
    w = 1.0 - v
    e2 = tl.where(w == 1.0, v * 1.4426950408889634, v * (_log2(w, FAST) / (w - 1.0)))
    return -_log2(e2, FAST)


@triton.jit
def _load_x(row_ptr, col, stride_v, vocab_size):
    return tl.load(row_ptr + col.to(tl.int64) * stride_v, mask=col < vocab_size,
                   other=float("-inf")).to(tl.float32)


@triton.jit
def _best(x, col, vocab_size, scale, v, best, best_i, best_x, NOISE: tl.constexpr, FAST: tl.constexpr):
    """Fold one [LANES] block into the per-lane best (score, column, raw logit); strict > keeps the earlier,
    lower column on a tie."""
    valid = col < vocab_size
    if NOISE:
        score = x * scale + _gumbel2(v, FAST)
    else:
        score = x
    score = tl.where(valid, score, float("-inf"))
    better = (score > best) | ((best_i < 0) & valid)   # the first valid column, even at score -inf
    best = tl.where(better, score, best)
    best_i = tl.where(better, col, best_i)
    best_x = tl.where(better, x, best_x)
    return best, best_i, best_x


@triton.jit
def _partial_kernel(logits_ptr, stride_s, stride_v, vocab_size, temp_ptr, seed_ptr, offset_ptr,
                    m_ptr, s_ptr, best_ptr, idx_ptr, x_ptr, n_splits,
                    LANES: tl.constexpr, GROUPS_PER_SPLIT: tl.constexpr, FAST: tl.constexpr):
    """Program (row, split): columns [split * GROUPS_PER_SPLIT * 4 * LANES, ...) of the row, in column groups of
    4 * LANES; writes the split's max and sum of 2**((x - max) * log2 e), and its best (score, column, logit)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_s
    t = tl.load(temp_ptr + row)
    seed = tl.load(seed_ptr + row)
    offset = tl.load(offset_ptr + row)
    noise = t >= 1e-5
    scale = tl.where(noise, tl.math.div_rn(1.4426950408889634, tl.where(noise, t, 1.0)), 1.0)   # log2(e) / T
    k = tl.arange(0, LANES)
    m = tl.full([LANES], float("-inf"), tl.float32)
    s = tl.zeros([LANES], dtype=tl.float32)
    best = tl.full([LANES], float("-inf"), tl.float32)
    best_i = tl.full([LANES], -1, tl.int32)
    best_x = tl.full([LANES], float("-inf"), tl.float32)
    g0 = split * GROUPS_PER_SPLIT
    for g in range(g0, g0 + GROUPS_PER_SPLIT):
        c0 = g * (4 * LANES) + k
        c1 = c0 + LANES
        c2 = c1 + LANES
        c3 = c2 + LANES
        x0 = _load_x(row_ptr, c0, stride_v, vocab_size)
        x1 = _load_x(row_ptr, c1, stride_v, vocab_size)
        x2 = _load_x(row_ptr, c2, stride_v, vocab_size)
        x3 = _load_x(row_ptr, c3, stride_v, vocab_size)
        # normaliser, in base 2: one rescale per lane and group
        m_new = tl.maximum(tl.maximum(m, tl.maximum(x0, x1)), tl.maximum(x2, x3))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0) * 1.4426950408889634
        s = (s * tl.exp2(m * 1.4426950408889634 - m_safe)
             + tl.exp2(x0 * 1.4426950408889634 - m_safe) + tl.exp2(x1 * 1.4426950408889634 - m_safe)
             + tl.exp2(x2 * 1.4426950408889634 - m_safe) + tl.exp2(x3 * 1.4426950408889634 - m_safe))
        m = m_new
        if noise:
            v0, v1, v2, v3 = _uniforms4(seed, offset, g, LANES)
            best, best_i, best_x = _best(x0, c0, vocab_size, scale, v0, best, best_i, best_x, True, FAST)
            best, best_i, best_x = _best(x1, c1, vocab_size, scale, v1, best, best_i, best_x, True, FAST)
            best, best_i, best_x = _best(x2, c2, vocab_size, scale, v2, best, best_i, best_x, True, FAST)
            best, best_i, best_x = _best(x3, c3, vocab_size, scale, v3, best, best_i, best_x, True, FAST)
        else:
            best, best_i, best_x = _best(x0, c0, vocab_size, scale, x0, best, best_i, best_x, False, FAST)
            best, best_i, best_x = _best(x1, c1, vocab_size, scale, x1, best, best_i, best_x, False, FAST)
            best, best_i, best_x = _best(x2, c2, vocab_size, scale, x2, best, best_i, best_x, False, FAST)
            best, best_i, best_x = _best(x3, c3, vocab_size, scale, x3, best, best_i, best_x, False, FAST)
    # lanes -> split
    m_top = tl.max(m, axis=0)
    m_top_safe = tl.where(m_top > float("-inf"), m_top, 0.0)
    s_top = tl.sum(s * tl.exp2((tl.where(m > float("-inf"), m, m_top_safe) - m_top_safe) * 1.4426950408889634),
                   axis=0)
    top = tl.max(best, axis=0)
    idx = tl.min(tl.where((best == top) & (best_i >= 0), best_i, 2147483647), axis=0)
    x_top = tl.max(tl.where(best_i == idx, best_x, float("-inf")), axis=0)
    out = row * n_splits + split
    tl.store(m_ptr + out, m_top)
    tl.store(s_ptr + out, s_top)
    tl.store(best_ptr + out, top)
    tl.store(idx_ptr + out, idx)
    tl.store(x_ptr + out, x_top)


@triton.jit
def _combine_kernel(m_ptr, s_ptr, best_ptr, idx_ptr, x_ptr, n_splits, tokens_ptr, logprobs_ptr,
                    SPLITS: tl.constexpr):
    """Program row: the splits' partials -> the row's token (best score, then lowest column) and its raw logprob."""
    row = tl.program_id(0)
    j = tl.arange(0, SPLITS)
    ok = j < n_splits
    base = row * n_splits
    m = tl.load(m_ptr + base + j, mask=ok, other=float("-inf"))
    s = tl.load(s_ptr + base + j, mask=ok, other=0.0)
    best = tl.load(best_ptr + base + j, mask=ok, other=float("-inf"))
    idx = tl.load(idx_ptr + base + j, mask=ok, other=2147483647)
    x = tl.load(x_ptr + base + j, mask=ok, other=float("-inf"))
    m_top = tl.max(m, axis=0)
    m_top_safe = tl.where(m_top > float("-inf"), m_top, 0.0)
    s_top = tl.sum(s * tl.exp2((tl.where(m > float("-inf"), m, m_top_safe) - m_top_safe) * 1.4426950408889634),
                   axis=0)
    lse = m_top_safe + tl.log2(s_top) * 0.6931471805599453
    top = tl.max(best, axis=0)
    token = tl.min(tl.where(best == top, idx, 2147483647), axis=0)
    x_token = tl.max(tl.where(idx == token, x, float("-inf")), axis=0)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, x_token - lse)


def _check(logits: torch.Tensor, vocab_size: int, temperature: torch.Tensor, seeds: torch.Tensor,
           offsets: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [S, V], got {tuple(logits.shape)}")
    if not 1 <= vocab_size <= logits.shape[1]:
        raise ValueError(f"vocab_size {vocab_size} outside 1..{logits.shape[1]}")
    n = logits.shape[0]
    for name, t, dtype in (("temperature", temperature, torch.float32), ("seeds", seeds, torch.int64),
                           ("offsets", offsets, torch.int64)):
        if t.shape != (n,) or t.dtype != dtype or t.device != logits.device:
            raise ValueError(f"{name} must be [{n}] {dtype} on {logits.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")


def fused_sample(logits: torch.Tensor, vocab_size: int, temperature: torch.Tensor, seeds: torch.Tensor,
                 offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [S, V'] bf16/fp16/fp32 on CUDA (row stride may exceed V'; only the first vocab_size columns count).
    temperature: [S] float32; a row with temperature < 1e-5 is greedy (argmax of the logits).
    seeds, offsets: [S] int64; the random draw of row i depends only on (seeds[i], offsets[i]) and the column,
    never on the row index or the batch (so a seeded request repeats whatever shares its batch).
    Returns (tokens [S] int64, logprobs [S] float32): the sampled token of each row and its log-probability
    under the RAW distribution log_softmax(logits[:, :vocab_size]) (no temperature)."""
    _check(logits, vocab_size, temperature, seeds, offsets)
    n = logits.shape[0]
    tokens = torch.empty(n, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return tokens, logprobs
    temperature, seeds, offsets = temperature.contiguous(), seeds.contiguous(), offsets.contiguous()
    # the split of a row depends on vocab_size only, so a row's logprob (its sum order) never depends on the batch
    n_splits = triton.cdiv(vocab_size, GROUPS_PER_SPLIT * RNG_GROUP)
    part = torch.empty(4, n, n_splits, dtype=torch.float32, device=logits.device)
    idx = torch.empty(n, n_splits, dtype=torch.int32, device=logits.device)
    _partial_kernel[(n, n_splits)](logits, logits.stride(0), logits.stride(1), vocab_size, temperature, seeds,
                                   offsets, part[0], part[1], part[2], idx, part[3], n_splits, LANES=RNG_LANES,
                                   GROUPS_PER_SPLIT=GROUPS_PER_SPLIT, FAST=_FAST_LOG, num_warps=8)
    _combine_kernel[(n,)](part[0], part[1], part[2], idx, part[3], n_splits, tokens, logprobs,
                          SPLITS=max(triton.next_power_of_2(n_splits), 2), num_warps=1)
    return tokens, logprobs


@triton.jit
def _draw_uniforms_kernel(seed_ptr, offset_ptr, out_ptr, vocab_size, LANES: tl.constexpr):
    row = tl.program_id(0)
    g = tl.program_id(1)
    seed = tl.load(seed_ptr + row)
    offset = tl.load(offset_ptr + row)
    v0, v1, v2, v3 = _uniforms4(seed, offset, g, LANES)
    base = out_ptr + row.to(tl.int64) * vocab_size
    c0 = g * (4 * LANES) + tl.arange(0, LANES)
    tl.store(base + c0, v0, mask=c0 < vocab_size)
    tl.store(base + c0 + LANES, v1, mask=c0 + LANES < vocab_size)
    tl.store(base + c0 + 2 * LANES, v2, mask=c0 + 2 * LANES < vocab_size)
    tl.store(base + c0 + 3 * LANES, v3, mask=c0 + 3 * LANES < vocab_size)


def draw_uniforms(seeds: torch.Tensor, offsets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[S, vocab_size] float32: the v of every column of every row's draw, exactly as fused_sample draws them
    (uniform on (0, 1); the column's exponential is E = -log1p(-v))."""
    n = seeds.shape[0]
    out = torch.empty(n, vocab_size, dtype=torch.float32, device=seeds.device)
    if n:
        grid = (n, triton.cdiv(vocab_size, RNG_GROUP))
        _draw_uniforms_kernel[grid](seeds.contiguous(), offsets.contiguous(), out, vocab_size, LANES=RNG_LANES)
    return out


def reference_scores(logits: torch.Tensor, vocab_size: int, temperature: torch.Tensor,
                     uniforms: torch.Tensor) -> torch.Tensor:
    """[S, vocab_size] float32: the score fused_sample maximises (x / T - log E, or x for greedy rows)."""
    x = logits[:, :vocab_size].float()
    greedy = (temperature < GREEDY_EPS).unsqueeze(1)
    inv_t = torch.where(greedy.squeeze(1), torch.ones_like(temperature), 1.0 / temperature).unsqueeze(1)
    noisy = x * inv_t - torch.log(-torch.log1p(-uniforms))
    return torch.where(greedy, x, noisy)


def reference_sample(logits: torch.Tensor, vocab_size: int, temperature: torch.Tensor, seeds: torch.Tensor,
                     offsets: torch.Tensor, uniforms: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_sample in torch ops, on the same random numbers (`draw_uniforms`, computed here unless given)."""
    _check(logits, vocab_size, temperature, seeds, offsets)
    if uniforms is None:
        uniforms = draw_uniforms(seeds, offsets, vocab_size)
    tokens = reference_scores(logits, vocab_size, temperature, uniforms).argmax(dim=-1)
    logprobs = torch.log_softmax(logits[:, :vocab_size].float(), dim=-1)
    return tokens, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
