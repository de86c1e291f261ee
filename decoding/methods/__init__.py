"""One module per mitigation method; each registers itself with ``@register``.

The registry imports every module of this package on first use.
"""
