"""bes-orchestrator: a folder or a queue table in, Azure ML BES jobs out, every step recorded."""

#: The one place the version is written: pyproject.toml reads it (`[tool.setuptools.dynamic]`).
__version__ = "0.2.0"
