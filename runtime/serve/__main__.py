"""`python -m dmf_deploy.runtime.serve` is `dmf-serve`."""

from dmf_deploy.runtime.serve.server import main

main()
