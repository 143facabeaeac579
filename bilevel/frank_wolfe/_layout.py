"""Vectorised block layout shared by every feasible set (internal).

Every set of this package is a product of B *atomic blocks*.  Block b owns a contiguous run of
coordinates I_b and is the convex hull of its *atoms*

    o_b + tau_b e_i   (i in I_b)                      "plus" atoms
    o_b - tau_b e_i   (i in I_b, symmetric blocks)    "minus" atoms
    o_b               (blocks with an origin vertex)  the "origin" atom

with o_b the block's offset (floor) and tau_b > 0 its scale.  FlooredSimplex: o = eps*1, tau, with
origin (v_0 = eps*1, v_i = eps*1 + tau e_i).  ProbabilitySimplex: o = 0, tau = 1, no origin.  L1Ball:
o = 0, tau = radius, symmetric.  Box: one block per coordinate, o = lower, tau = upper - lower, with
origin.  Barycentric weights are one flat tensor laid out as

    [plus weights (dim) | minus weights (dim, only if some block is symmetric) | origin weights (B)]

so x = o + tau_c * (w_plus - w_minus) coordinatewise (tau_c = tau of the coordinate's block), and the
weights of each block sum to 1.  All per-block reductions run as one vectorised op: a plain reduction
for one block, a ``view(B, r)`` when all blocks have the same size r, ``index_add``/``scatter_reduce``
otherwise.  No Python loop over blocks.
"""
from __future__ import annotations

import torch


class Layout:
    """Tensors describing the blocks, materialised for one (dtype, device)."""

    def __init__(self, sizes, offset, scale, has_origin, symmetric, dtype, device):
        self.dtype, self.device = dtype, device
        self.sizes = list(int(s) for s in sizes)
        self.B = len(self.sizes)
        self.dim = sum(self.sizes)
        sizes_t = torch.tensor(self.sizes, dtype=torch.long)
        self.sizes_t = sizes_t.to(device)
        self.starts = (torch.cumsum(sizes_t, 0) - sizes_t).to(device)
        self.block_id = torch.repeat_interleave(torch.arange(self.B), sizes_t).to(device)
        self.uniform = self.sizes[0] if all(s == self.sizes[0] for s in self.sizes) else None
        self.offset = offset.to(device=device, dtype=dtype)
        self.scale = scale.to(device=device, dtype=dtype)
        self.scale_c = self.scale[self.block_id]
        self.has_origin = has_origin.to(device)
        self.symmetric = symmetric.to(device)
        self.any_sym = bool(symmetric.any())
        self.any_origin = bool(has_origin.any())
        self.all_origin = bool(has_origin.all())
        self.sym_c = self.symmetric[self.block_id]
        self.n_minus = self.dim if self.any_sym else 0
        self.a0 = self.dim + self.n_minus                    # index of the first origin atom
        self.n_atoms = self.a0 + self.B
        parts = [self.block_id] + ([self.block_id] if self.any_sym else []) + \
                [torch.arange(self.B, device=device)]
        self.atom_block = torch.cat(parts)
        self.arange_dim = torch.arange(self.dim, device=device)
        self.arange_B = torch.arange(self.B, device=device)
        # the weights of atoms that do not exist are always 0
        exists = torch.ones(self.n_atoms, dtype=torch.bool, device=device)
        if self.any_sym:
            exists[self.dim:self.a0] = self.sym_c
        exists[self.a0:] = self.has_origin
        self.atom_exists = exists

    def per_coord(self, v: torch.Tensor) -> torch.Tensor:
        """(B,) -> broadcastable against (dim,) (no gather for a single block)."""
        return v if self.B == 1 else v[self.block_id]

    def per_atom(self, v: torch.Tensor) -> torch.Tensor:
        """(B,) -> broadcastable against (n_atoms,)."""
        return v if self.B == 1 else v[self.atom_block]

    # ---- segment reductions over blocks ------------------------------------------------------
    def seg_sum(self, v: torch.Tensor) -> torch.Tensor:
        """(dim,) -> (B,): sum over each block."""
        if self.B == 1:
            return v.sum().reshape(1)
        if self.uniform is not None:
            return v.view(self.B, self.uniform).sum(1)
        return v.new_zeros(self.B).index_add_(0, self.block_id, v)

    def seg_min(self, v: torch.Tensor):
        """(dim,) -> (values (B,), global coordinate index (B,)) of each block's minimum (first on ties)."""
        if self.B == 1:
            m, i = v.min(0)
            return m.reshape(1), i.reshape(1)
        if self.uniform is not None:
            m, i = v.view(self.B, self.uniform).min(1)
            return m, i + self.starts
        m = v.new_full((self.B,), float("inf")).scatter_reduce(0, self.block_id, v, "amin")
        cand = torch.where(v == m[self.block_id], self.arange_dim, self.dim)
        i = torch.full((self.B,), self.dim, dtype=torch.long, device=v.device)
        i = i.scatter_reduce(0, self.block_id, cand, "amin")
        # a block whose entries are all +inf keeps index dim: point it at its first coordinate
        i = torch.where(i >= self.dim, self.starts, i)
        return m, i

    def seg_max(self, v: torch.Tensor):
        """Like seg_min for the maximum."""
        if self.B == 1:
            m, i = v.max(0)
            return m.reshape(1), i.reshape(1)
        if self.uniform is not None:
            m, i = v.view(self.B, self.uniform).max(1)
            return m, i + self.starts
        m, i = self.seg_min(-v)
        return -m, i

    def block_weight_sums(self, w: torch.Tensor) -> torch.Tensor:
        s = self.seg_sum(w[:self.dim]) + w[self.a0:]
        if self.any_sym:
            s = s + self.seg_sum(w[self.dim:self.a0])
        return s

    def combine(self, w: torch.Tensor) -> torch.Tensor:
        """x = o + tau_c * (w_plus - w_minus)."""
        rel = w[:self.dim]
        if self.any_sym:
            rel = rel - w[self.dim:self.a0]
        return self.offset + self.scale_c * rel

    def padded(self, v: torch.Tensor, fill) -> torch.Tensor:
        """(dim,) -> (B, r_max) with ``fill`` (scalar or (B,)) in the padding."""
        if self.uniform is not None:
            return v.view(self.B, self.uniform)
        rmax = max(self.sizes)
        fill = torch.as_tensor(fill, dtype=v.dtype, device=v.device)
        out = fill.reshape(-1, 1).expand(self.B, rmax).clone() if fill.dim() else \
            v.new_full((self.B, rmax), float(fill))
        pos = self.arange_dim - self.starts[self.block_id]
        out[self.block_id, pos] = v
        return out

    def unpad(self, m: torch.Tensor) -> torch.Tensor:
        if self.uniform is not None:
            return m.reshape(-1)
        pos = self.arange_dim - self.starts[self.block_id]
        return m[self.block_id, pos]
