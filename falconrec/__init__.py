"""The front door: the `falconrec` command (cli.py) and the build it runs (build.py), above every other package."""
