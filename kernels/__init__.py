"""Attention kernels: a torch reference that is the specification, and fused Triton kernels for
GPUs. Importing this package never requires triton or a GPU."""
