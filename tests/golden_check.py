"""Golden-file comparison shared by the golden tests (``LMPROG_UPDATE_GOLDEN=1`` rewrites the files)."""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("LMPROG_UPDATE_GOLDEN") == "1"  # set to 1 to rewrite the expected files; review the diff


def check_golden(actual: str, expected_path: Path) -> None:
    """Assert ``actual`` equals the file's text (or write it when updating)."""
    if UPDATE:
        expected_path.write_text(actual, encoding="utf-8")
        return
    assert expected_path.exists(), f"missing golden file {expected_path}; run with LMPROG_UPDATE_GOLDEN=1"
    assert actual == expected_path.read_text(encoding="utf-8"), f"output differs from {expected_path.name}:\n{actual}"
