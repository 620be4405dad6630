"""The package ships its type hints (PEP 561): src/meanflow/py.typed exists and is package
data, so an installed meanflow is type-checked by mypy/pyright against its annotations."""

from __future__ import annotations

import re
from pathlib import Path

import meanflow

ROOT = Path(__file__).resolve().parents[1]


def test_py_typed_is_in_the_package_and_its_data():
    assert (Path(meanflow.__file__).parent / "py.typed").is_file()
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"\[tool\.setuptools\.package-data\]\n(.*?)\n\n", text + "\n\n", re.S)
    assert block is not None and re.search(r'meanflow = \[[^\]]*"py\.typed"', block.group(1))
