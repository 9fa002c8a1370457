"""Mechanistic analyses of trained runs (SPEC §7): clipgen-analyze (clipgen.analyze.run.run_analyze)."""
