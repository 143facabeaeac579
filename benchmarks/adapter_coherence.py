"""How distinct are the components a trained dEBORA adapter kept? One row per run directory.

    .venv/bin/python benchmarks/adapter_coherence.py RUN_DIR [RUN_DIR ...]

For every matrix adapter of rank r ≥ 2 in ``RUN_DIR/adapter`` (``U`` of shape (m, r), ``V`` (n, r),
``s`` (r,)), with û_i = u_i/‖u_i‖ and v̂_i likewise:

- coherence: max_{i≠j} |û_iᵀ û_j| (and the same for V): 0 for orthonormal (Stiefel) bases, 1 when two
  components point the same way;
- effective rank of U diag(s) Vᵀ (the trained part of the update; ΔW0 is folded into the weight):
  (Σσ)² / Σσ² over its singular values σ, between 1 (one direction carries everything) and r.

Prints the median of each over the layers, and how many layers had r ≥ 2.
"""
from __future__ import annotations

import os
import statistics
import sys

import torch

from debora import read_adapter   # debora.from_pretrained's reader: checksums, format version, finiteness


def layer_stats(U: torch.Tensor, V: torch.Tensor, s: torch.Tensor):
    U, V, s = U.double(), V.double(), s.double()
    off = ~torch.eye(U.shape[1], dtype=torch.bool)

    def coherence(B):
        B = B / B.norm(dim=0)
        return float((B.T @ B).abs()[off].max())

    sv = torch.linalg.svdvals((U * s) @ V.T)
    return coherence(U), coherence(V), float(sv.sum() ** 2 / (sv ** 2).sum())


def run_stats(run_dir: str):
    meta, t = read_adapter(os.path.join(run_dir, "adapter"))      # ValueError naming the file if it is not one
    rows = [layer_stats(t[f"{n}.U"], t[f"{n}.V"], t[f"{n}.s"]) for n, layer in meta["layers"].items()
            if layer["rank"] >= 2 and t.get(f"{n}.U", torch.empty(0)).dim() == 2]   # matrix adapters
    return len(meta["layers"]), rows


def main(argv) -> int:
    if not argv:
        print(__doc__)
        return 2
    print("| run | layers with r ≥ 2 | coherence U (median) | coherence V (median) | effective rank (median) |")
    print("|---|---:|---:|---:|---:|")
    for d in argv:
        n, rows = run_stats(d)
        med = [statistics.median(col) for col in zip(*rows)] if rows else [float("nan")] * 3
        print(f"| {os.path.basename(os.path.normpath(d))} | {len(rows)} of {n} | {med[0]:.3f} | {med[1]:.3f} | "
              f"{med[2]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
