"""Rows: the unit of work shared by every gradient method.

A *unit* is one example and a run of consecutive target steps ``t0 .. t1-1``. Its decoder row holds the
tokens ``0 .. t1-2`` (everything those steps condition on); the logits of step ``t`` are read at position
``t - 1``. One forward of the row serves all its steps, then one backward per step (vector-Jacobian
product) gives that step's gradient; these backwards run several at a time, as one batched (``vmap``)
backward over the saved forward. With one step per unit this is a batch of stacked prefixes
(Inseq's loop, batched); with all steps in one unit it is a single teacher-forced forward followed by
per-target backwards. :func:`plan_units` picks the run length that minimises the work.

A unit is expanded into one row per *path point* (the interpolation points of integrated gradients,
the samples of GradientSHAP, or the single input point of saliency); rows are packed into batches
under a token budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .base import Example

# Cost of a row's backward relative to its forward, per token, parameters frozen (only input gradients flow):
# measured 0.84-1.06 on SmolLM2-135M on a 2-core CPU (50 rows x 30 tokens and 10 x 30, LM head at one position).
BACKWARD_TO_FORWARD = 1.0
# Fixed cost of one forward pass in token-equivalents: every weight is read once per pass, which dominates for
# short batches on a CPU. The step backwards of a unit are batched (several steps per pass), so only the
# forward pays it per unit.
PASS_OVERHEAD_TOKENS = 32


@dataclass(frozen=True)
class Unit:
    """Steps ``steps`` (consecutive target positions) of example ``example``; the row has ``length`` tokens."""

    example: int
    steps: tuple[int, ...]

    @property
    def length(self) -> int:
        return self.steps[-1]


def unit_cost(length: int, n_steps: int) -> float:
    """Token-passes of one unit: a forward of ``length`` tokens plus ``n_steps`` backwards over it."""
    return length + PASS_OVERHEAD_TOKENS + BACKWARD_TO_FORWARD * n_steps * length


def split_steps(example: Example, width: int) -> list[tuple[int, ...]]:
    steps = list(range(example.start, example.end))
    return [tuple(steps[i : i + width]) for i in range(0, len(steps), width)]


def choose_width(examples: list[Example], max_width: int | None = None) -> int:
    """The run length (steps per row) that minimises total token-passes over all examples."""
    longest = max((ex.n_steps for ex in examples), default=1)
    candidates = sorted({1, *[2**i for i in range(1, 12) if 2**i < longest], longest})
    if max_width is not None:
        candidates = [w for w in candidates if w <= max_width] or [1]

    def total(width: int) -> float:
        return sum(unit_cost(c[-1], len(c)) for ex in examples for c in split_steps(ex, width))

    return min(candidates, key=total)


def plan_units(examples: list[Example], width: int | None) -> list[Unit]:
    """All units of all examples, with ``width`` steps per unit (None: cost-model choice)."""
    width = width or choose_width(examples)
    return [Unit(i, chunk) for i, ex in enumerate(examples) if ex.n_steps > 0 for chunk in split_steps(ex, width)]


@dataclass(frozen=True)
class Piece:
    """Rows ``points`` (indices into the unit's path points) of ``unit``."""

    unit: int
    points: tuple[int, ...]


def pack(
    units: list[Unit], n_points: int | list[int], token_budget: int, extra_tokens: list[int] | None = None
) -> list[list[Piece]]:
    """Pack every (unit, point) row into batches of at most ``token_budget`` padded tokens.

    Units are visited longest first so that rows of similar length share a batch. A unit whose rows
    alone exceed the budget is split into pieces of points (their gradients are accumulated).
    ``extra_tokens[u]`` adds per-row tokens (the encoder source) to unit ``u``'s cost. ``n_points`` is the
    number of rows of every unit, or of each unit.
    """
    counts = n_points if isinstance(n_points, list) else [n_points] * len(units)
    order = sorted(range(len(units)), key=lambda u: -units[u].length)
    batches: list[list[Piece]] = []
    current: list[Piece] = []
    rows, width = 0, 0
    for u in order:
        row_len = units[u].length + (extra_tokens[u] if extra_tokens else 0)
        per_piece = max(1, min(counts[u], token_budget // max(row_len, 1)))
        for first in range(0, counts[u], per_piece):
            points = tuple(range(first, min(counts[u], first + per_piece)))
            new_width = max(width, row_len)
            if current and (rows + len(points)) * new_width > token_budget:
                batches.append(current)
                current, rows, new_width = [], 0, row_len
            current.append(Piece(u, points))
            rows += len(points)
            width = new_width
    if current:
        batches.append(current)
    return batches


def pack_suffixes(units: list[Unit], counts: list[int], token_budget: int,
                  first_position: Callable[[int, int], int]) -> list[list[Piece]]:
    """Pack rows that start after a cached prefix: point ``q`` of unit ``u`` computes positions
    ``first_position(u, q) .. length - 1`` only (non-decreasing in ``q``).

    One unit per batch (the rows share that unit's cached prefix); consecutive points, as many as fit
    ``token_budget`` at the width of the batch's first (longest) row.
    """
    batches: list[list[Piece]] = []
    for u in sorted(range(len(units)), key=lambda u: -units[u].length):
        first = 0
        while first < counts[u]:
            width = max(1, units[u].length - first_position(u, first))
            last = min(counts[u], first + max(1, token_budget // width))
            batches.append([Piece(u, tuple(range(first, last)))])
            first = last
    return batches


@dataclass(frozen=True)
class RowModel:
    """How a method turns an example into rows: its cost model, read by :func:`distattr.planner.plan`.

    ``backward``: the rows need a backward (gradient methods) or are forward-only (perturbation methods).
    ``points(args, unit)``: rows per unit (``args`` is the method's argument dataclass; for ``whole_sequence``
    methods ``unit`` is the whole example, all attributed steps). ``steps_per_row``: None = the engine's cost
    model (:func:`choose_width`), 1 = one step per row (stacked prefixes). ``copies``: forwards per row
    (Captum's DeepLIFT runs input and baseline together). ``whole_sequence``: forward-only rows over the whole
    sequence, one set per example. ``per_layer``: ``points`` counts the rows of one decoder layer, the whole run has
    that many per layer (activation patching: one restoration per layer and position); the planner multiplies by
    the model's layer count. ``recomputes``: the rows run through the gradient kernel, which can keep only the
    hidden states between blocks and recompute them in the backward (:mod:`distattr.models.recompute`).
    """

    backward: bool
    points: Callable[[object, Unit], int]
    steps_per_row: int | None = None
    copies: int = 1
    whole_sequence: bool = False
    per_layer: bool = False
    recomputes: bool = False


def one_row(args: object, unit: Unit) -> int:
    """``points`` of a method with one row per unit (the input itself): saliency, input x gradient."""
    return 1


def n_steps_rows(args: object, unit: Unit) -> int:
    """``points`` of a path method: ``args.n_steps`` rows per unit."""
    return args.n_steps


def n_samples_rows(args: object, unit: Unit) -> int:
    """``points`` of a sampling method: ``args.n_samples`` rows per unit."""
    return args.n_samples
