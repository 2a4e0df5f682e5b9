"""Checkpoints: the resolver (presets, directories, hub ids), loading with TTT attached, presets, config sections,
the fine-tuning fork's formats, writing TTT checkpoints."""
