"""Python helpers imported by the sample programs (import "helpers.py" as h)."""


def is_prime(s):
    try:
        n = int(s)
    except ValueError:
        return False
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def digits_only(s):
    return s.isdigit()


def score(text, weight=1.0):
    return -weight * len(text)
