"""Everything that speaks SQL. Callers get `orchestrator.jobs` records back."""
