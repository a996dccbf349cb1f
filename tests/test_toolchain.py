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


def _requirements(extra=None):
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    out = set()
    for r in map(Requirement, reqs):
        if r.name == "attnchain":  # a self-reference: attnchain[offline,viz]
            for e in r.extras:
                out |= _requirements(e)
        else:
            out.add(r.name.lower())
    return out


def test_colab_installs_what_the_chapters_import():
    """Each chapter installs ``attnchain[chapters]`` in Colab, and that covers its imports."""
    import ast
    import sys
    from importlib.metadata import packages_distributions

    import nbformat

    allowed = _requirements() | _requirements("chapters")
    dists = packages_distributions()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        code = [c.source for c in nb.cells if c.cell_type == "code"]
        assert '%pip install -q "attnchain[chapters] @ git+' in code[0], path.name
        for src in code[1:]:
            tree = ast.parse("\n".join(l for l in src.splitlines() if not l.startswith("%")))
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0
                         else [])
                for top in {n.split(".")[0] for n in names}:
                    if top in sys.stdlib_module_names or top in ("attnchain", "IPython"):
                        continue  # IPython: every Jupyter kernel has it
                    owners = {d.lower() for d in dists.get(top, [])}
                    assert owners & allowed, (f"{path.name} imports {top} ({owners}), which "
                                              f"attnchain[chapters] does not install")


def test_chapter_code_fits_the_article_column():
    """The browser check fails a chapter whose code scrolls sideways; catch it before the build.

    100 characters fit the article column of a 1280-pixel window (tests/test_book.py); 104 did not.
    """
    import nbformat

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        wide = [line for c in nb.cells if c.cell_type == "code"
                for line in c.source.splitlines() if len(line) > 100]
        assert not wide, f"{path.name}: code lines over 100 characters: {wide[:3]}"
