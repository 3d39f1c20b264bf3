"""Golden diagnostics: every diagnostic class, with its exact message, location, caret and help.

Each ``tests/golden/errors/NAME.lmp`` must fail to compile; the rendered :class:`LmpError` must equal
``NAME.err``. Programs are compiled with their bare file name (so the expected output does not depend on where
the repository lives) and with relative paths resolved in the golden folder (shown as ``<DIR>``).
"""

from __future__ import annotations

import pytest

from lmprog.dsl.errors import LmpError
from lmprog.program import Program

from golden_check import GOLDEN, check_golden

FOLDER = GOLDEN / "errors"
CASES = sorted(FOLDER.glob("*.lmp"))


def render(path) -> str:
    try:
        Program(path.read_text(encoding="utf-8"), path.name, base_dir=FOLDER)
    except LmpError as err:
        assert err.diagnostics, "an LmpError always carries at least one diagnostic"
        return err.render().replace(str(FOLDER), "<DIR>") + "\n"
    pytest.fail(f"{path.name} compiled without errors")


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_diagnostics_golden(path):
    check_golden(render(path), path.with_suffix(".err"))


def test_all_errors_are_reported_in_order():
    """A file with one mistake of each kind reports every one of them, sorted by position."""
    try:
        Program((FOLDER / "all_errors.lmp").read_text(), "all_errors.lmp", base_dir=FOLDER)
    except LmpError as err:
        lines = [(d.span.line, d.span.col) for d in err.diagnostics]
        assert lines == sorted(lines)
        assert len({line for line, _ in lines}) >= 9
    else:
        pytest.fail("all_errors.lmp compiled")
