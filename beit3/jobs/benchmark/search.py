"""The largest micro-batch that fits: doubling, then bisection."""
from __future__ import annotations

from typing import Callable


def largest_fitting(fits: Callable[[int], bool], limit: int, start: int = 1) -> int:
    """Largest n in [start, limit] with ``fits(n)``, for a ``fits`` that is True up to some n* and
    False above (memory). Doubles from ``start`` until a size fails or ``limit`` is reached, then
    bisects between the last size that fit and the first that did not. 0 if ``start`` does not fit.
    Calls ``fits`` about 2 log2(n*) times."""
    if not 1 <= start <= limit:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    if not fits(start):
        return 0
    good, bad = start, None
    while bad is None:
        nxt = min(2 * good, limit)
        if nxt == good:
            return good
        if fits(nxt):
            good = nxt
        else:
            bad = nxt
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good
