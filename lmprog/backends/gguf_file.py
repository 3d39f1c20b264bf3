"""Reading GGUF files: metadata as plain Python values, tensors dequantized to numpy with ``gguf``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

# Quantization types we load (dequantized with llama.cpp's own reader).
SUPPORTED_TYPES = {
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q2_K,
    GGMLQuantizationType.Q3_K, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K, GGMLQuantizationType.Q8_K,
}  # fmt: skip


class GGUFError(ValueError):
    """A GGUF file could not be read or uses something we do not support."""


class GGUFFile:
    """An opened GGUF file: ``metadata`` (key -> value) and ``tensor(name)`` -> float32 array.

    Tensors come back in row-major numpy order, i.e. a GGUF tensor of ``ne = [in, out]`` is returned as
    ``[out, in]``: the layout of a PyTorch ``nn.Linear`` weight.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._reader = GGUFReader(self.path, "r")
        except Exception as exc:  # gguf raises bare ValueError/struct errors on malformed files
            raise GGUFError(f"{self.path}: not a readable GGUF file ({exc})") from exc
        self.metadata = {key: _field_value(f) for key, f in self._reader.fields.items()}
        self._tensors = {t.name: t for t in self._reader.tensors}

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor(self, name: str) -> np.ndarray:
        t = self._tensors.get(name)
        if t is None:
            raise GGUFError(f"{self.path}: tensor {name!r} is missing")
        if t.tensor_type not in SUPPORTED_TYPES:
            raise GGUFError(
                f"{self.path}: tensor {name!r} has quantization {t.tensor_type.name}, which is not supported; "
                f"supported: {', '.join(sorted(q.name for q in SUPPORTED_TYPES))}"
            )
        data = dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return np.asarray(data, dtype=np.float32).reshape(shape)


def _field_value(field):
    try:
        return field.contents()
    except Exception:  # unusual field types: keep the raw parts rather than fail the whole file
        return None
