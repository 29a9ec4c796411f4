"""``python -m spartan_cli ...``: the ``spartan`` command without its console script."""

from spartan_cli.cli.main import main

if __name__ == "__main__":
    main()
