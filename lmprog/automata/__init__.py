"""The constraint runtime: what the inference kernels call to constrain a hole (``mask``, ``step``, ``done``)
and the one rule for reading a hole's value. :mod:`lmprog.compiler` builds these objects; :mod:`lmprog.inference`
uses them; this package imports neither."""

from lmprog.automata.values import ValueRule, generated_bytes

__all__ = ["ValueRule", "generated_bytes"]
