"""Evaluation: POPE, CHAIR and MME loaders and scorers (numbers equal to the reference scripts),
the eval runner and reports. The SynthCOCO world they run on by default is ``veridical.world``."""
