"""A user attribution method packaged as a plugin module: importing it registers ``embedding_norm``.

Use it as ``distattr.methods.load_plugins(["plugin_method"])`` or ``--plugin plugin_method`` with ``tests/`` on
the import path (the tests' ``conftest.py`` puts it there, as for ``tiny``), then
``attribute(..., method="embedding_norm", ord=1.0)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distattr import register_method
from distattr.methods.base import MethodOutput, Request, attributed_sides, empty_outputs
from distattr.methods.rows import RowModel, one_row


@dataclass(frozen=True)
class EmbeddingNormArgs:
    """``ord``: the order ``p`` of the vector norm (2: Euclidean, 1: sum of absolute values)."""

    ord: float = 2.0

    def __post_init__(self):
        if not self.ord > 0:
            raise ValueError(f"ord must be > 0, not {self.ord!r}")


def embedding_norm(req: Request, args: EmbeddingNormArgs) -> list[MethodOutput]:
    """Embedding norm: how large each input token's (scaled) embedding is, for every step that sees it.

    For input token ``x_i`` with scaled embedding ``e_i = s * E[x_i]`` (``[d]``; ``s`` the model's embedding
    scale, 1 for most models; the space gradient methods attribute in) the score is ``||e_i||_p`` with
    ``p = args.ord``. It does not depend on the step, so column ``t - start`` of the target matrix ``[N, T]``
    repeats the norms of tokens ``0 .. t-1`` (rows ``>= t`` are NaN, future tokens); the source matrix
    ``[S, T]`` (encoder-decoder models) repeats the source norms in every column. No forward or backward.

    Returns:
        one :class:`MethodOutput` per example (float32, CPU).
    """
    sides = attributed_sides(req)
    outputs = []
    with torch.no_grad():
        for ex in req.examples:
            source, target = empty_outputs(ex, sides)
            if source is not None:
                norms = torch.linalg.vector_norm(req.adapter.embed(ex.source_ids, "source"), ord=args.ord, dim=-1)
                source[:] = norms.float().cpu()[:, None]
            if target is not None:
                norms = torch.linalg.vector_norm(req.adapter.embed(ex.target_ids, "target"), ord=args.ord, dim=-1)
                norms = norms.float().cpu()
                for column, t in enumerate(range(ex.start, ex.end)):
                    target[:t, column] = norms[:t]
            outputs.append(MethodOutput(source=source, target=target))
    return outputs


# One forward-only row per example is an upper bound on its cost (it runs no forward at all). replace=True: this
# module may be imported under two names (``plugin_method`` and ``tests.plugin_method``); both register the same.
register_method("embedding_norm", embedding_norm, EmbeddingNormArgs, kind="custom",
                summary="||scale * E[x_i]||_p of each input token's embedding",
                cost=RowModel(backward=False, points=one_row, whole_sequence=True), replace=True)
