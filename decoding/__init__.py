"""Decoding: the batched engine, search strategies, branches and the mitigation methods."""
