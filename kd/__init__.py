"""``python -m kd`` is the ``kd`` command; it exists so that ``torchrun -m kd run ...`` works.

torchrun starts a Python module with ``-m``; ``kd`` is the name users know, the
code lives in :mod:`kdcore` (see docs/distributed.md).
"""
