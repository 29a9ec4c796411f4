"""The gated attention with a hand-written backward: the default path for the paper's gate kind.

Same maths as the autograd composition in ``attention.reference_attention`` (docs/method.md, "Gated attention"),
in fewer passes over the (batch, n_heads, q, k) tensors and with less kept for the backward:
1. s = q k^T * scaling + c in one pass (fp32), with c = 0 where a query may read a key and finfo.min where
   not: no boolean tensor the size of s is ever built (boolean ops are slow on CPUs), and every gate of a
   pair the query may not read is shut by its own logit g = s + b ~ finfo.min.
2. P = softmax(s). g = s + b is formed separately: folding a large b into the softmax's input would round s.
3. Gates as float 0/1: sampled M = 1[g + l > 0] with logistic noise l drawn exactly as the reference
   draws it (same generator, same shape, same ops, so the same bits), deterministic 1[g > 0], or forced.
4. y = (P * M) v.  When recording, the density term sum sigmoid(g) / allowed pairs and the open counts.
The backward keeps 4 bytes per (query, key) pair of sampled gates and none otherwise (autograd's
composition kept 30-odd, eager attention 4-5): sigmoid(g + l), whose sign carries M (sigmoid(z) >= 1/2
exactly when a sampled gate is open); it recomputes s = q k^T * scaling + c, P = softmax(s) and sigmoid(s + b)
with the forward's own ops, so bit for bit.
    dA  = dy v^T                       dv = A^T dy                with A = P * M
    ds  = A * dA - P * rowsum(A * dA)                             softmax, through the open gates
        + sigmoid'(g + l) * P * dA                                straight-through sample
        + sigmoid'(g) * d(density) / allowed pairs                 density term
    dq  = ds k * scaling               dk = ds^T q * scaling
Queries go in blocks of ``BLOCK_ROWS`` rows, each against the keys up to the last one any of its rows may
read: under a causal mask the upper triangle is mostly skipped (T = 256 in blocks of 64: 5/8 of the work).
``forward_block`` / ``backward_block`` compute one block. For long sequences ``tiled`` keeps nothing of size q x k.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

NOISE_EPS = 1e-6  # u is clamped to [eps, 1 - eps] before the logistic transform, as in gates.GateKind.sample
BLOCK_ROWS = 64  # query rows per block of the fused path


@dataclass
class Gating:
    """How one call gates, besides q, k, v; filled by ``attention.gated_attention_forward``."""

    bias: float  # b in g = s + b
    sample: bool  # draw M ~ Bernoulli(sigmoid(g)) with the straight-through gradient
    forced: torch.Tensor | None = None  # float 0/1 broadcastable to (batch, n_heads, q, k): M, no gradient
    generator: object = None  # None, a torch.Generator, or one generator per batch row
    record: bool = False  # the density term (differentiable) and open-gate counts
    keep_logits: bool = False  # return g (-inf on pairs a query may not read)
    keep_pattern: bool = False  # return P


@dataclass
class Masks:
    """The keys each query may read, in the two forms the paths use."""

    additive: torch.Tensor  # (batch|1, 1, q, k) fp32: 0 where allowed, finfo.min where not
    allowed: torch.Tensor  # (batch|1, 1, q, k) bool
    n_allowed: torch.Tensor  # (batch|1, 1) fp32 allowed pairs per sequence, at least 1
    bias: float = 0.0  # the gate bias b: g = s + b is formed apart from the softmax's s (no rounding of s by b)

    @classmethod
    def from_allowed(cls, allowed: torch.Tensor, bias: float) -> "Masks":
        additive = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
        additive.masked_fill_(~allowed, torch.finfo(torch.float32).min)
        n = allowed.sum(dim=(-1, -2)).clamp_min(1).to(torch.float32)
        return cls(additive=additive, allowed=allowed, n_allowed=n, bias=float(bias))

    def block(self, rows: slice, keys: slice) -> "Masks":
        return Masks(self.additive[..., rows, keys], self.allowed[..., rows, keys], self.n_allowed, self.bias)

    def key_ends(self) -> list[int]:
        """Per query row, 1 + the last key any sequence lets it read (0 for a row that reads nothing)."""
        cols = torch.arange(1, self.allowed.shape[-1] + 1, device=self.allowed.device)  # (k,)
        return (self.allowed.any(dim=0).any(dim=0) * cols).amax(dim=-1).tolist()  # (q,)

    def row_blocks(self, rows_per_block: int, *, whole_rows: bool = False) -> list[tuple[slice, slice]]:
        """(query rows, keys) of each block: keys end after the last key a row of the block may read
        (every key with ``whole_rows``, when whole (q, k) results are kept)."""
        q_len, k_len = self.allowed.shape[-2:]
        ends = [k_len] * q_len if whole_rows else self.key_ends()
        out = []
        for r0 in range(0, q_len, rows_per_block):
            r1 = min(q_len, r0 + rows_per_block)
            out.append((slice(r0, r1), slice(0, max(1, max(ends[r0:r1])))))
        return out


def draw_noise(shape: tuple, *, generator, device, rows: slice, keys: slice) -> torch.Tensor:
    """U(0, 1) noise (batch, n_heads, rows, keys) for the gates of query ``rows`` and ``keys``, drawn as the
    reference draws it: one ``torch.rand`` over the shape, or one per batch row when there is a generator
    per row. ``rows``/``keys`` say which pairs the draw covers (tests substitute a fixed noise tensor)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(shape, device=device, dtype=torch.float32, generator=generator)
    assert len(generator) == shape[0], (len(generator), shape)
    return torch.stack([torch.rand(shape[1:], device=device, dtype=torch.float32, generator=g) for g in generator])


@dataclass
class Block:
    """What ``forward_block`` computed for a block of query rows."""

    out: torch.Tensor  # (batch, n_heads, rows, d_head) in v's dtype
    density_sum: torch.Tensor | None = None  # (batch, n_heads) sum of sigmoid(g) over allowed pairs
    open_pairs: torch.Tensor | None = None  # (batch, n_heads) int64 count of 1[g > 0] over allowed pairs
    saved: dict = field(default_factory=dict)  # what backward_block needs: P, sz, sg, m
    gate_logits: torch.Tensor | None = None
    pattern: torch.Tensor | None = None


def forward_block(q, k, v, masks: Masks, scaling: float, gating: Gating, rows: slice, keys: slice, *, keep: bool,
                  noise: torch.Tensor | None = None) -> Block:
    """Gated attention of query block ``q`` (batch, n_heads, rows, d_head) fp32 against keys k (batch,
    n_heads, keys, d_head) fp32 and values v (batch, n_heads, keys, d_v); ``masks`` cut to the block.
    ``keep``: keep what the backward needs besides q and k: the signed sigmoid(g + l) of sampled gates
    (the backward recomputes P, M and sigmoid(g) from q and k).
    ``noise``: the block's U(0, 1) draws, else drawn here."""
    s = torch.matmul(q, k.transpose(-1, -2))  # q.k, (batch, n_heads, rows, keys) fp32
    s = torch.add(masks.additive, s, alpha=scaling, out=s)  # s = q.k * scaling; ~finfo.min where a query may not read
    p = torch.softmax(s, dim=-1)  # P = softmax(s), (batch, n_heads, rows, keys)
    # g = s + b, formed apart from s: adding a large b to s before the softmax would round s away
    need_g = gating.keep_logits or gating.record or gating.forced is None
    g = torch.add(s, masks.bias) if need_g else None  # (batch, n_heads, rows, keys)
    block = Block(out=None)
    if gating.keep_logits:
        block.gate_logits = g.masked_fill(~masks.allowed, float("-inf"))
    if gating.keep_pattern:
        block.pattern = p.clone()  # P itself may become A below
    sz = None
    if gating.forced is not None:
        m = (gating.forced * masks.allowed).to(torch.float32).expand_as(p)
    elif gating.sample:
        if noise is None:
            noise = draw_noise(s.shape, generator=gating.generator, device=s.device, rows=rows, keys=keys)
        u = noise.clamp(NOISE_EPS, 1.0 - NOISE_EPS)
        z = torch.log(u)
        z.sub_(u.neg_().log1p_()).add_(g)  # z = g + l, l = log u - log(1 - u): the reference's ops and bits
        m = torch.gt(z, 0, out=u)  # M = 1[g + l > 0] as float 0/1, in u's buffer
        sz = z.sigmoid_()  # sigmoid(g + l)
    else:
        m = torch.gt(g, 0, out=torch.empty_like(g))  # 1[g > 0]; shut on pairs a query may not read
    if gating.record:
        sg = torch.sigmoid(g)  # sigmoid(g): exactly 0 on pairs a query may not read
        block.density_sum = sg.sum(dim=(-1, -2))
        opened = m if (gating.forced is None and not gating.sample) else torch.gt(g, 0, out=torch.empty_like(g))
        block.open_pairs = opened.sum(dim=(-1, -2)).to(torch.int64)  # exact: a block has < 2^24 pairs per head
    a = p.mul_(m)  # A = P * M
    block.out = torch.matmul(a.to(v.dtype), v)  # (batch, n_heads, rows, d_v)
    if keep and sz is not None:
        block.saved["sz"] = sz.mul_(m.mul_(2.0).sub_(1.0))  # sign: +sigmoid(z) where open, -sigmoid(z) where shut
    return block


def _recompute(q, k, saved: dict, masks: Masks, scaling: float, forced) -> dict:
    """A block's P, M and sigmoid(g), computed again from q and k."""
    s = torch.matmul(q, k.transpose(-1, -2))  # (batch, n_heads, rows, keys)
    s = torch.add(masks.additive, s, alpha=scaling, out=s)  # the forward's s, bit for bit
    g = torch.add(s, masks.bias)  # the forward's g
    out = {"p": torch.softmax(s, dim=-1), "sg": torch.sigmoid(g)}  # the forward's P and sigmoid(g), bit for bit
    if "sz" in saved:
        out["sz"] = saved["sz"]
    elif forced is not None:
        out["m"] = (forced * masks.allowed).to(torch.float32).expand_as(g)
    else:
        out["m"] = torch.gt(g, 0, out=g)  # 1[g > 0], as the forward drew it
    return out


def backward_block(q, k, v, saved: dict, scaling: float, dy, d_density, n_allowed, *, masks: Masks, forced=None):
    """Gradients of one query block: returns (dq (batch, n_heads, rows, d_head) fp32, dk, dv) where dk, dv
    are this block's contributions over every key (dv None when ``dy`` is None). ``dy``: (batch, n_heads,
    rows, d_v) or None; ``d_density``: (batch, n_heads) or None; ``saved``: what ``forward_block`` kept;
    P, M and sigmoid(g) are recomputed from the block's ``masks`` and ``forced`` gates."""
    saved = _recompute(q, k, saved, masks, scaling, forced)
    p = saved["p"]
    ds, dv = None, None
    if dy is not None:
        if "sz" in saved:
            sz = saved["sz"]
            m = torch.gt(sz, 0, out=torch.empty_like(sz))  # the sign of the saved sigmoid(z) is M
            sz = sz.abs()
        else:
            sz, m = None, saved["m"]
        a = p * m  # A = P * M, (batch, n_heads, rows, k)
        dy = dy.to(v.dtype)
        dv = torch.matmul(a.to(v.dtype).transpose(-1, -2), dy)  # (batch, n_heads, k, d_v)
        da = torch.matmul(dy, v.transpose(-1, -2)).to(torch.float32)  # dA, (batch, n_heads, rows, k)
        ds = a.mul_(da)  # A * dA
        ds.addcmul_(p, ds.sum(dim=-1, keepdim=True), value=-1.0)  # softmax backward through the open gates
        if sz is not None:
            ds.add_(torch.ops.aten.sigmoid_backward(da.mul_(p), sz))  # straight-through: sigmoid'(g + l) P dA
    if d_density is not None:
        c = (d_density / n_allowed)[..., None, None].expand_as(p)  # (batch, n_heads, rows, k), stride 0
        term = torch.ops.aten.sigmoid_backward(c, saved["sg"])
        ds = term if ds is None else ds.add_(term)
    if ds is None:
        return torch.zeros_like(q), torch.zeros_like(k), None
    dq = torch.matmul(ds, k).mul_(scaling)
    dk = torch.matmul(ds.transpose(-1, -2), q).mul_(scaling)
    return dq, dk, dv


@dataclass
class Blocks:
    """What ``run_blocks`` computed over every block of a call."""

    out: torch.Tensor  # (batch, n_heads, q, d_v) in v's dtype
    density_sum: torch.Tensor | None  # (batch, n_heads)
    side: dict  # open_pairs (batch, n_heads) int64; gate_logits, pattern (batch, n_heads, q, k) when kept
    saved: list  # per block: the dict backward_block needs (empty unless ``keep``)


def run_blocks(q, k, v, masks: Masks, scaling: float, gating: Gating, blocks: list, *, keep: bool,
               noise: torch.Tensor | None = None) -> Blocks:
    """``forward_block`` over ``blocks`` [(rows, keys)], assembling the output and summing the stats.
    ``noise``: U(0, 1) for all (q, k) pairs, sliced per block."""
    batch, n_heads, q_len, _ = q.shape
    out = torch.empty(batch, n_heads, q_len, v.shape[-1], dtype=v.dtype, device=v.device)
    density_sum, open_pairs, logits, patterns, saved = None, None, [], [], []
    for rows, keys in blocks:
        block_gating = gating
        if gating.forced is not None and gating.forced.dim() == 4 and gating.forced.shape[-2] > 1:
            block_gating = dataclasses.replace(gating, forced=gating.forced[..., rows, keys])
        block = forward_block(q[:, :, rows], k[:, :, keys], v[:, :, keys], masks.block(rows, keys), scaling,
                              block_gating, rows, keys, keep=keep,
                              noise=None if noise is None else noise[:, :, rows, keys])
        out[:, :, rows] = block.out
        if gating.record:
            density_sum = block.density_sum if density_sum is None else density_sum + block.density_sum
            open_pairs = block.open_pairs if open_pairs is None else open_pairs + block.open_pairs
        logits.append(block.gate_logits)
        patterns.append(block.pattern)
        saved.append(block.saved)
    side = {"open_pairs": open_pairs,
            "gate_logits": torch.cat(logits, dim=2) if gating.keep_logits else None,
            "pattern": torch.cat(patterns, dim=2) if gating.keep_pattern else None}
    return Blocks(out=out, density_sum=density_sum, side=side, saved=saved)


def backward_blocks(q, k, v, masks: Masks, scaling: float, blocks: list, saved: list, d_out, d_density, forced=None):
    """Sum ``backward_block`` over ``blocks``, ``saved[i]`` what block i's forward kept -> (dq, dk, dv)."""
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device) if d_out is not None else None
    for i, (rows, keys) in enumerate(blocks):
        dy = None if d_out is None else d_out[:, :, rows]
        block_forced = forced
        if forced is not None and forced.dim() == 4 and forced.shape[-2] > 1:
            block_forced = forced[..., rows, keys]
        dq_b, dk_b, dv_b = backward_block(q[:, :, rows], k[:, :, keys], v[:, :, keys], saved[i], scaling, dy,
                                          d_density, masks.n_allowed, masks=masks.block(rows, keys),
                                          forced=block_forced)
        dq[:, :, rows] = dq_b
        dk[:, :, keys] += dk_b
        if dv_b is not None:
            dv[:, :, keys] += dv_b
    return dq, dk, None if dv is None else dv.to(v.dtype)


def _full_noise(q, k, gating: Gating):
    """The reference's draw: U(0, 1) for every (q, k) pair in one call, so the same seed gives the same gates."""
    if not gating.sample:
        return None
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return draw_noise(shape, generator=gating.generator, device=q.device, rows=slice(0, shape[2]),
                      keys=slice(0, shape[3]))


class FusedGatedAttention(torch.autograd.Function):
    """Gated attention over blocks of query rows, keeping each block's P, sigmoid(g + l), sigmoid(g).
    forward(q, k, v, masks, scaling, gating, side) -> (out (batch, n_heads, q, d_v), density term (batch, n_heads));
    ``side`` (a dict) receives the non-differentiable results: open_pairs, gate_logits, pattern."""

    @staticmethod
    def forward(ctx, q, k, v, masks: Masks, scaling: float, gating: Gating, side: dict):
        blocks = masks.row_blocks(BLOCK_ROWS, whole_rows=gating.keep_logits or gating.keep_pattern)
        with torch.autocast(device_type=q.device.type, enabled=False):
            result = run_blocks(q, k, v, masks, scaling, gating, blocks, keep=True,
                                noise=_full_noise(q, k, gating))
        side.update(result.side)
        density = (result.density_sum / masks.n_allowed if gating.record
                   else torch.zeros(q.shape[:2], device=q.device))
        names = [sorted(d) for d in result.saved]
        ctx.blocks, ctx.names, ctx.scaling, ctx.record, ctx.bias = blocks, names, scaling, gating.record, masks.bias
        ctx.forced = gating.forced is not None
        forced = [gating.forced] if gating.forced is not None else []
        ctx.save_for_backward(q, k, v, masks.additive, masks.allowed, masks.n_allowed, *forced,
                              *[d[n] for d, ns in zip(result.saved, names) for n in ns])
        ctx.set_materialize_grads(False)
        return result.out, density

    @staticmethod
    def backward(ctx, d_out, d_density):
        q, k, v, additive, allowed, n_allowed, *flat = ctx.saved_tensors
        forced = flat.pop(0) if ctx.forced else None
        saved, i = [], 0
        for ns in ctx.names:
            saved.append(dict(zip(ns, flat[i:i + len(ns)])))
            i += len(ns)
        masks = Masks(additive=additive, allowed=allowed, n_allowed=n_allowed, bias=ctx.bias)
        with torch.autocast(device_type=q.device.type, enabled=False):
            dq, dk, dv = backward_blocks(q, k, v, masks, ctx.scaling, ctx.blocks, saved, d_out,
                                         d_density if ctx.record else None, forced=forced)
        return dq, dk, dv, None, None, None, None


def fused_attention(q, k, v, masks: Masks, scaling: float, gating: Gating) -> tuple:
    """(out (batch, n_heads, q, d_v), density term (batch, n_heads) or None, side results dict)."""
    side: dict = {}
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, density = FusedGatedAttention.apply(q, k, v, masks, scaling, gating, side)
        return out, (density if gating.record else None), side
    blocks = masks.row_blocks(BLOCK_ROWS, whole_rows=gating.keep_logits or gating.keep_pattern)
    with torch.autocast(device_type=q.device.type, enabled=False):
        result = run_blocks(q, k, v, masks, scaling, gating, blocks, keep=False, noise=_full_noise(q, k, gating))
    density = result.density_sum / masks.n_allowed if gating.record else None
    return result.out, density, result.side
