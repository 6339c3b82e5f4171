"""Activation parameters per row of a GEMM, from a time-group table.

The ``cuda`` kernels see ``x`` as an ``(M, K)`` matrix: ``x`` of shape ``(B, ..., K)`` with
``M = B * R`` rows, ``R`` rows per sample. An activation parameter comes as a 1-D table with one
entry per time group (``ditq_compiler.activation_ops`` convention), and ``group`` picks the entry:

    group is None       the table has one entry; every row uses it              (static per-tensor)
    group (B,) or ()    int64, the time group of each sample (or of all of them):
                        the rows of sample b use table[group[b]]                (time-grouped)

``row_entries`` gathers those entries once per sample (B values, not M) and returns how many
consecutive rows share one entry, so a kernel reads the entry of row m at ``m // rows_per_entry``.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor


def row_entries(tables: Sequence[Tensor], group: Optional[Tensor], x: Tensor) -> tuple[list[Tensor], int]:
    """Each table's entries (1-D, fp32, contiguous) and the number of rows of x that share one entry."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    sizes = {t.numel() for t in tables}
    for table in tables:
        if table.dim() != 1 or table.numel() == 0:
            raise ValueError(f"activation parameter tables must be 1-D with one entry per time group, got shape "
                             f"{tuple(table.shape)}")
    if len(sizes) != 1:
        raise ValueError(f"activation parameter tables of different lengths {sorted(sizes)}")
    if group is None:
        if sizes != {1}:
            raise ValueError(f"a table of {next(iter(sizes))} time groups needs the group of each sample")
        return [t.float().contiguous() for t in tables], max(rows, 1)
    if group.dim() > 1 or (group.dim() == 1 and group.numel() not in (1, x.shape[0])):
        raise ValueError(f"time group index of shape {tuple(group.shape)} does not match a batch of {x.shape[0]} "
                         f"(input shape {tuple(x.shape)})")
    index = group.reshape(-1).long().clamp(0, next(iter(sizes)) - 1)
    per_entry = rows // index.numel() if index.numel() > 1 else rows
    return [t[index].float().contiguous() for t in tables], max(per_entry, 1)


__all__ = ["row_entries"]
