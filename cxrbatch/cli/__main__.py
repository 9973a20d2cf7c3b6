"""`python -m cxrbatch.cli`: the same command line as the `cxrbatch` script."""

from cxrbatch.cli import main

main()
