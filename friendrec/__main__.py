"""`python -m friendrec` == `friendrec`."""

from friendrec.cli import main

main()
