"""Evaluation: POPE, CHAIR and MME loaders and scorers (numbers equal to the reference scripts),
the synthetic SynthCOCO world, the eval runner and reports."""
