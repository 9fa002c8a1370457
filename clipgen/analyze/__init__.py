"""Mechanistic analyses of trained runs (protocol §7): clipgen-analyze (clipgen.analyze.run.run_analyze)."""
