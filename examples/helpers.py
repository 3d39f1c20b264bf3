"""Python helpers for the examples (``import "helpers.py" as h``)."""


def score(text: str) -> float:
    """Prefer poems with three lines."""
    lines = [line for line in text.strip().split("\n") if line.strip()]
    return -abs(len(lines) - 3)


def is_prime(s: str) -> bool:
    try:
        n = int(s)
    except ValueError:
        return False
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))
