"""Procedural coloured-shape scenes (the tiny-shapes model's training data) and the evaluator that judges images."""
