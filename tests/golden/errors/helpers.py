"""Fixture for the import checks: functions a program may call as h.name(...)."""


def is_prime(s):
    n = int(s)
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def valid_prefix(s):
    return s.isdigit()


SCALE = 2
