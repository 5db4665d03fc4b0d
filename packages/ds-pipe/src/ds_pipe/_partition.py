"""Splitting a layer list into contiguous stages: DeepSpeed's ``uniform``, ``parameters`` and ``type:REGEX``.

``parts`` is a list of ``num_stages + 1`` boundaries: stage ``s`` owns layers ``parts[s]:parts[s+1]``.
Every method either gives each stage at least one layer or raises naming the empty stage: an empty stage
would otherwise surface as a hang or a shape error deep inside the schedule.
"""

from __future__ import annotations


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """Equal layer counts; the first ``num_items % num_parts`` stages take one extra (DeepSpeed's rule)."""
    chunk, extra = divmod(num_items, num_parts)
    parts = [0]
    for p in range(num_parts):
        parts.append(parts[-1] + chunk + (1 if p < extra else 0))
    return parts


def _fits(weights: list[int], num_parts: int, cap: int) -> bool:
    """Can ``weights`` be cut into at most ``num_parts`` contiguous pieces each weighing <= ``cap``?"""
    pieces, load = 1, 0
    for w in weights:
        if w > cap:
            return False
        if load + w > cap:
            pieces, load = pieces + 1, 0
        load += w
    return pieces <= num_parts


def partition_balanced(weights: list[int], num_parts: int) -> list[int]:
    """Contiguous split into ``num_parts`` non-empty stages minimising the heaviest stage.

    Binary search on the heaviest stage's weight (integer weights: parameter or layer counts), then a greedy
    fill that keeps one layer back for each stage still to fill, so no stage is left empty when there are at
    least as many layers as stages."""
    n = len(weights)
    if n < num_parts:
        return partition_uniform(n, num_parts)  # has empty stages; the caller names them
    lo, hi = max(weights, default=0), sum(weights)
    while lo < hi:
        mid = (lo + hi) // 2
        if _fits(weights, num_parts, mid):
            hi = mid
        else:
            lo = mid + 1
    parts, i = [0], 0
    for p in range(num_parts - 1):
        left_for_others = num_parts - 1 - p
        load = weights[i]
        i += 1  # every stage takes at least one layer
        while i < n - left_for_others and load + weights[i] <= lo:
            load += weights[i]
            i += 1
        parts.append(i)
    parts.append(n)
    return parts


def check_parts(parts: list[int], num_stages: int, method: str, names: list[str],
                unit: str = "pipeline stage") -> None:
    for s in range(num_stages):
        if parts[s + 1] <= parts[s]:
            raise ValueError(
                f"partition_method={method!r} leaves {unit} {s} of {num_stages} with no layers "
                f"(boundaries {parts}, {len(names)} layers: {names}); use fewer stages or more layers")
