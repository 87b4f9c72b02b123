"""`python -m bnpipe` runs the same CLI as the `bnpipe` console script."""

from bnpipe.cli import main

main()
