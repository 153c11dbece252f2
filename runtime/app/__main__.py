"""`python -m dmf_deploy.runtime.app` is `dmf-run`."""

from dmf_deploy.runtime.app.cli import main

main()
