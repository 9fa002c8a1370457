"""clipgen-export: a CLIP run's checkpoint as a folder plain open_clip loads (clipgen.models.export)."""
