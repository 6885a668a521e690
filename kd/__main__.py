"""``python -m kd run ...`` (and ``torchrun --nproc-per-node N -m kd run ...``): the ``kd`` command."""
from kdcore.cli import console_main

console_main()
