"""`python -m threadgate.cli`: how `threadgate dev` starts its pods."""

from . import main

main()
