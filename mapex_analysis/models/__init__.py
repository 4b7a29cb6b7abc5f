"""Model code (the top-level ``models/`` directory holds artifacts: checkpoints and cards)."""
