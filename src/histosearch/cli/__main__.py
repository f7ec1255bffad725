"""`python -m histosearch.cli`."""

from histosearch.cli import main

main()
