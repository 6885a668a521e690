"""``python -m kdcore`` is the ``kd`` command (e.g. under torchrun)."""
from kdcore.cli import console_main

console_main()
