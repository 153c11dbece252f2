"""Tools over the core: dmf-bench (bench.py), dmf-demo (demo.py), dmf-explain (explain_cli.py)."""
