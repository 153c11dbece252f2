"""`python -m dmf_deploy.train ...` (what torchrun launches) is `dmf-train ...`."""

from .cli import main

main()
