"""Benchmarks of the friendrec stack (run through `friendrec bench ...`, never from pytest).

They are commands rather than tests because their numbers depend on the machine and its load;
each one prints a table and writes JSON with the machine's description beside the numbers.
"""
