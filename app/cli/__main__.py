"""`python -m threadgate.cli`: how `threadgate dev` starts its pods."""

from . import main

if __name__ == "__main__":  # imported (pkgutil.walk_packages), it must not run
    main()
