"""Head profiling: per-(layer, head) scores (VHD, image-attention share, visual sensitivity) and
massive-activation (sink) dimensions, cached per model fingerprint and reused by the methods."""
