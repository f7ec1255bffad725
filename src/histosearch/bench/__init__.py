"""Benchmarks behind `histosearch bench`: the figures the README reports, never timed tests.

One module per benchmark; each depends only on the library below it, never on the command
line, and nothing in the library imports this package.
"""
