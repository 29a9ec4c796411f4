"""The gated attention in (query block, key block) tiles: memory that grows linearly in the sequence length.

The fused path (``fused``) keeps 4 bytes per (query, key) pair of sampled gates for its backward, so a step's
memory still grows with T^2. This path keeps nothing of size q x k, flash-attention style:
1. Forward, per block of query rows, over blocks of keys: s = q k^T * scaling (finfo.min where a query may not
   read), g = s + b, the gates M, and an online softmax: the running row maximum m and denominator l are
   kept over *all* keys the query may read, while only the open pairs enter the numerator:
       y = sum_j exp(s_j - m) M_j v_j / sum_j exp(s_j - m)  =  (P * M) v,  P = softmax(s) over all keys,
   the same maths as the reference (A = P * M, no renormalisation). Kept for the backward: q, k, v, the fp32
   output and lse = m + log l per row, and one noise seed per sequence.
2. Sampled gates use counter-based noise: u = hash(seed, head, query position, key position), so every tile
   draws its own noise independently of the tiling, and the backward draws the very same bits again.
3. Backward, tile by tile, recomputing P = exp(s - lse), M and sigmoid(g + l):
       dA = dy v^T      ds = A * dA - P * D,  D = rowsum(dy * y)  (= rowsum(A * dA): the softmax through the open gates)
          + sigmoid'(g + l) * P * dA                                (straight-through sample)
          + sigmoid'(g) * d(density) / allowed pairs                (density term, blockwise)
       dq = ds k * scaling     dk = ds^T q * scaling     dv = A^T dy
The noise differs from the fused path's (torch.rand from the gate generators), its distribution does not:
with the same U(0, 1) draws the two paths agree to float error (tests/test_attention.py). Tiles are square-ish,
sized so one tile's fp32 scores stay under ``GateState.chunk_mb`` whatever T is. Selected by
``attention.choose_path`` for calls whose whole (batch, n_heads, q, k) scores would exceed ``chunk_mb``.
"""

from __future__ import annotations

import math

import torch

from spartan_cli.gating.fused import NOISE_EPS, Gating

NEG = torch.finfo(torch.float32).min  # the score of a pair a query may not read: its gate logit is ~NEG too
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1  # odd multiplier spreading the seed and head before they are mixed


def tile_shape(q: torch.Tensor, k: torch.Tensor, chunk_mb: float) -> tuple[int, int]:
    """(query rows, keys) per tile so one tile's fp32 (batch, n_heads, rows, keys) scores stay under ``chunk_mb``."""
    batch, n_heads = q.shape[:2]
    pairs = max(1, int(chunk_mb * 2**20) // (4 * batch * n_heads))  # (query, key) pairs per head in a tile
    rows = min(q.shape[2], max(1, math.isqrt(pairs)))
    return rows, min(k.shape[2], max(1, pairs // rows))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) of int64 tensors holding values below 2^32."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def noise_seeds(gating: Gating, batch: int, device) -> torch.Tensor | None:
    """One int64 seed per sequence (batch,), drawn from the gate generator(s) (one draw per call, so a run's
    gates follow its seed and a resumed run its restored generator state); None without sampled gates."""
    if not gating.sample:
        return None
    gens = gating.generator
    if gens is None or isinstance(gens, torch.Generator):
        gen = gens
        kw = {} if gen is None else {"generator": gen, "device": gen.device}
        return torch.randint(0, 2**31 - 1, (1,), **kw).to(device).expand(batch).contiguous()
    return torch.cat([torch.randint(0, 2**31 - 1, (1,), generator=g, device=g.device).to(device) for g in gens])


def tile_noise(seeds: torch.Tensor, n_heads: int, rows: slice, keys: slice) -> torch.Tensor:
    """U(0, 1) fp32 noise (batch, n_heads, rows, keys) of the pairs (query ``rows``, ``keys``): a function of
    (seed, head, query position, key position) only, on the seeds' device."""
    dev = seeds.device
    head = torch.arange(n_heads, device=dev).view(1, -1, 1, 1)
    row = torch.arange(rows.start, rows.stop, device=dev).view(1, 1, -1, 1)
    key = torch.arange(keys.start, keys.stop, device=dev).view(1, 1, 1, -1)
    per_row = _mix32(_mix32(seeds.view(-1, 1, 1, 1) * _GOLDEN + head) + row)  # (batch, n_heads, rows, 1)
    x = _mix32(per_row * _GOLDEN + key)  # (batch, n_heads, rows, keys)
    return ((x >> 8).to(torch.float32) + 0.5) * 2.0**-24  # 24 bits: exact in fp32, never 0 or 1


class _Tiles:
    """The tiles of one call and the per-tile maths its forward and backward share."""

    def __init__(self, q, k, allowed: torch.Tensor | None, scaling: float, gating: Gating, seeds,
                 tile: tuple[int, int]):
        self.q, self.k, self.allowed, self.scaling, self.gating, self.seeds = q, k, allowed, scaling, gating, seeds
        self.rows, self.keys = tile
        q_len, k_len = q.shape[2], k.shape[2]
        self.offset = k_len - q_len  # causal without a mask: query i is position offset + i (a KV cache)
        if allowed is None:
            self.key_ends = list(range(self.offset + 1, k_len + 1))
            n = q_len * (q_len + 1) // 2 + q_len * self.offset
            self.n_allowed = torch.full((1, 1), float(max(1, n)), device=q.device)
        else:
            cols = torch.arange(1, k_len + 1, device=allowed.device)
            self.key_ends = (allowed.any(dim=0).any(dim=0) * cols).amax(dim=-1).tolist()  # per row: last key read + 1
            self.n_allowed = allowed.sum(dim=(-1, -2)).clamp_min(1).to(torch.float32)  # (batch|1, 1)

    def row_blocks(self):
        q_len = self.q.shape[2]
        for r0 in range(0, q_len, self.rows):
            rows = slice(r0, min(q_len, r0 + self.rows))
            end = max(1, max(self.key_ends[rows]))
            yield rows, [slice(c0, min(end, c0 + self.keys)) for c0 in range(0, end, self.keys)]

    def allowed_tile(self, rows: slice, keys: slice) -> torch.Tensor:
        """(batch|1, 1, rows, keys) bool: the pairs of the tile a query may read."""
        if self.allowed is not None:
            return self.allowed[..., rows, keys]
        dev = self.q.device
        q_pos = torch.arange(rows.start, rows.stop, device=dev)[:, None] + self.offset
        return (torch.arange(keys.start, keys.stop, device=dev)[None, :] <= q_pos)[None, None]

    def gates(self, rows: slice, keys: slice):
        """(s, g, M float 0/1, sigmoid(g + l) or None) of one tile."""
        s = torch.matmul(self.q[:, :, rows], self.k[:, :, keys].transpose(-1, -2)).mul_(self.scaling)
        allowed = self.allowed_tile(rows, keys)
        s.masked_fill_(~allowed, NEG)
        g = s + self.gating.bias
        forced, sz = self.gating.forced, None
        if forced is not None:
            if forced.dim() == 4 and forced.shape[-2] > 1:
                forced = forced[..., rows, keys]
            m = (forced * allowed).to(torch.float32).expand_as(s)
        elif self.gating.sample:
            u = tile_noise(self.seeds, s.shape[1], rows, keys).clamp_(NOISE_EPS, 1.0 - NOISE_EPS)
            z = torch.log(u).sub_(torch.log1p(-u)).add_(g)  # g + l, l = log u - log(1 - u) ~ Logistic(0, 1)
            m = (z > 0).to(torch.float32)
            sz = z.sigmoid_()
        else:
            m = (g > 0).to(torch.float32)  # shut on pairs a query may not read (g ~ NEG)
        return s, g, m, sz


def _forward(tiles: _Tiles, v, *, record: bool):
    """(out fp32 (batch, n_heads, q, d_v), lse (batch, n_heads, q), density sum, open pairs) over every tile."""
    q = tiles.q
    batch, n_heads, q_len = q.shape[:3]
    out = torch.empty(batch, n_heads, q_len, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, n_heads, q_len, dtype=torch.float32, device=q.device)
    density = torch.zeros(batch, n_heads, dtype=torch.float32, device=q.device) if record else None
    open_pairs = torch.zeros(batch, n_heads, dtype=torch.int64, device=q.device) if record else None
    for rows, key_blocks in tiles.row_blocks():
        n = rows.stop - rows.start
        run_max = torch.full((batch, n_heads, n, 1), NEG, dtype=torch.float32, device=q.device)
        denom = torch.zeros(batch, n_heads, n, 1, dtype=torch.float32, device=q.device)
        acc = torch.zeros(batch, n_heads, n, v.shape[-1], dtype=torch.float32, device=q.device)
        for keys in key_blocks:
            s, g, m, _ = tiles.gates(rows, keys)
            if record:
                density += torch.sigmoid(g).sum(dim=(-1, -2))  # exactly 0 on pairs a query may not read
                open_pairs += (g > 0).sum(dim=(-1, -2))
            new_max = torch.maximum(run_max, s.amax(dim=-1, keepdim=True))
            rescale = torch.exp(run_max - new_max)
            e = torch.exp(s.sub_(new_max))  # exp(s - max), the softmax numerator over every key the row may read
            denom.mul_(rescale).add_(e.sum(dim=-1, keepdim=True))
            acc.mul_(rescale).add_(torch.matmul(e.mul_(m).to(v.dtype), v[:, :, keys]).float())  # open pairs only
            run_max = new_max
        out[:, :, rows] = acc.div_(denom)
        lse[:, :, rows] = (run_max + denom.log()).squeeze(-1)
    return out, lse, density, open_pairs


def _backward(tiles: _Tiles, v, out, lse, d_out, d_density):
    """(dq, dk, dv) fp32, tile by tile, recomputing each tile's P, M and sigmoid(g + l)."""
    q, k = tiles.q, tiles.k
    dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device) if d_out is not None else None
    dy = None if d_out is None else d_out.to(v.dtype)
    rowsum = None if d_out is None else (d_out.float() * out).sum(dim=-1, keepdim=True)  # D = rowsum(A * dA)
    per_pair = None if d_density is None else (d_density / tiles.n_allowed)[..., None, None]  # (batch, n_heads, 1, 1)
    for rows, key_blocks in tiles.row_blocks():
        for keys in key_blocks:
            s, g, m, sz = tiles.gates(rows, keys)
            p = torch.exp(s.sub_(lse[:, :, rows, None]))  # P, from the forward's lse over all keys
            ds = None
            if dy is not None:
                a = p * m  # A = P * M
                dv[:, :, keys] += torch.matmul(a.to(v.dtype).transpose(-1, -2), dy[:, :, rows]).float()
                da = torch.matmul(dy[:, :, rows], v[:, :, keys].transpose(-1, -2)).float()  # dA
                ds = a.mul_(da).sub_(p * rowsum[:, :, rows])  # softmax backward through the open gates
                if sz is not None:
                    ds.add_(torch.ops.aten.sigmoid_backward(da.mul_(p), sz))  # straight-through: sigmoid'(g + l) P dA
            if per_pair is not None:
                term = torch.ops.aten.sigmoid_backward(per_pair.expand_as(g), torch.sigmoid(g))
                ds = term if ds is None else ds.add_(term)
            if ds is None:
                continue
            dq[:, :, rows] += torch.matmul(ds, k[:, :, keys]).mul_(tiles.scaling)
            dk[:, :, keys] += torch.matmul(ds.transpose(-1, -2), q[:, :, rows]).mul_(tiles.scaling)
    return dq, dk, None if dv is None else dv.to(v.dtype)


class TiledGatedAttention(torch.autograd.Function):
    """forward(q, k, v, allowed, scaling, gating, side, tile) -> (out (batch, n_heads, q, d_v), density term
    (batch, n_heads)); ``side`` receives open_pairs and n_allowed (allowed pairs per sequence, (batch|1, 1))."""

    @staticmethod
    def forward(ctx, q, k, v, allowed, scaling: float, gating: Gating, side: dict, tile: tuple):
        seeds = noise_seeds(gating, q.shape[0], q.device)
        tiles = _Tiles(q, k, allowed, scaling, gating, seeds, tile)
        out, lse, density, open_pairs = _forward(tiles, v, record=gating.record)
        side.update(open_pairs=open_pairs, n_allowed=tiles.n_allowed)
        if density is None:
            density = torch.zeros(q.shape[:2], device=q.device)
        else:
            density = density / tiles.n_allowed
        extra = [t for t in (allowed, seeds, gating.forced) if t is not None]
        ctx.save_for_backward(q, k, v, out, lse, *extra)
        ctx.has = (allowed is not None, seeds is not None, gating.forced is not None)
        ctx.scaling, ctx.gating, ctx.tile = scaling, gating, tile
        ctx.set_materialize_grads(False)
        return out.to(v.dtype), density

    @staticmethod
    def backward(ctx, d_out, d_density):
        q, k, v, out, lse, *extra = ctx.saved_tensors
        allowed, seeds, forced = (extra.pop(0) if has else None for has in ctx.has)
        gating = Gating(bias=ctx.gating.bias, sample=ctx.gating.sample, forced=forced, record=ctx.gating.record)
        tiles = _Tiles(q, k, allowed, ctx.scaling, gating, seeds, ctx.tile)
        with torch.autocast(device_type=q.device.type, enabled=False):
            dq, dk, dv = _backward(tiles, v, out, lse, d_out, d_density if gating.record else None)
        return dq, dk, dv, None, None, None, None, None


def tiled_attention(q, k, v, allowed: torch.Tensor | None, scaling: float, gating: Gating, *, tile: tuple) -> tuple:
    """(out (batch, n_heads, q, d_v), density term (batch, n_heads) or None, side results dict); q, k fp32
    (batch, n_heads, q|k, d_head), ``allowed`` (batch|1, 1, q, k) bool or None for causal (queries the last
    q positions: no q x k mask is built), ``tile`` (query rows, keys)."""
    if gating.keep_logits or gating.keep_pattern:
        raise ValueError("the tiled path never holds whole (q, k) tensors; choose_path sends such calls elsewhere")
    side: dict = {}
    with torch.autocast(device_type=q.device.type, enabled=False):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            out, density = TiledGatedAttention.apply(q, k, v, allowed, scaling, gating, side, tile)
            return out, (density if gating.record else None), side
        seeds = noise_seeds(gating, q.shape[0], q.device)
        tiles = _Tiles(q, k, allowed, scaling, gating, seeds, tile)
        out, _, density, open_pairs = _forward(tiles, v, record=gating.record)
        side.update(open_pairs=open_pairs, n_allowed=tiles.n_allowed)
    return out.to(v.dtype), (density / tiles.n_allowed if gating.record else None), side
