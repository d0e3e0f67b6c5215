"""Primes for hash-table sizes: the moduli of the n-gram memory's tables must be distinct primes."""

from __future__ import annotations

import functools


def is_prime(n: int) -> bool:
    """Deterministic Miller–Rabin (exact for n < 3.3e24): table sizes are primes."""
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    if n < 2:
        return False
    for p in bases:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


@functools.lru_cache(maxsize=1024)
def largest_primes(limit: int, count: int) -> tuple[int, ...]:
    """The `count` largest primes <= `limit`, largest first (fewer when there are not enough)."""
    found: list[int] = []
    n = limit
    while len(found) < count and n >= 2:
        if is_prime(n):
            found.append(n)
        n -= 1
    return tuple(found)


def nth_prime(count: int) -> int:
    n, found = 1, 0
    while found < count:
        n += 1
        found += is_prime(n)
    return n


# Document kinds whose documents hold words (image-only documents hold marker tokens only).
TEXT_KINDS = ("text", "caption_image", "image_caption", "vqa")
