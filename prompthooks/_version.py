"""The library's one version number.

``pyproject.toml`` reads it from here (``[tool.setuptools.dynamic]``, by
parsing, without importing the package) and ``prompthooks.__version__``
re-exports it, so the installed metadata and the code cannot disagree. It
names the README changelog's top entry: ``X.Y.Z.devN`` while that entry is
``X.Y.Z (in progress)``, ``X.Y.Z`` once it is released (PEP 440: ``0.3.0.dev0``
sorts after ``0.2.0`` and before ``0.3.0``).
"""

__version__ = "0.3.0.dev0"
