"""The book toolchain is the one constraints/book.txt pins (the README's commands install it so)."""
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PINS = [Requirement(line) for line in (ROOT / "constraints" / "book.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("pin", PINS, ids=[p.name for p in PINS])
def test_installed_version_is_the_pinned_one(pin):
    try:
        installed = version(pin.name)
    except PackageNotFoundError:
        pytest.fail(f"{pin.name} is pinned in constraints/book.txt but not installed")
    assert installed in pin.specifier, (f"{pin.name} {installed} is installed, constraints/book.txt "
                                        f"pins {pin.specifier}: run `make setup` again")


def test_jupyter_book_is_1x():
    # Jupyter Book 2 has no Colab launch button and another configuration format
    assert any(p.name == "jupyter-book" and "1." in str(p.specifier) for p in PINS)
