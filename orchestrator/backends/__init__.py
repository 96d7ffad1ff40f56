"""Backends: remote services that run one job per input, behind one seam (`base.Backend`).

`registry.build` makes the backend a service section's `kind` names; `results` writes a
result file the same way for all of them. Implementations live in their own folders
(`bes/`, `rrs/`, ...). Kept free of imports so `storage` can use `results` without a cycle.
"""
