"""``python -m varshift``: the same command line as the ``varshift`` script."""

from varshift.cli import main

if __name__ == "__main__":
    main()
