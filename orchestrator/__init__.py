"""bes-orchestrator: a folder or a queue table in, Azure ML BES jobs out, every step recorded."""

__version__ = "0.1.0"
