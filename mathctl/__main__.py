"""`python -m mathctl` runs the CLI."""

from mathctl.cli import main

# The guard matters: vLLM starts its engine processes with `spawn`, which imports the parent's main
# module again in each child; without it every child would run the CLI from the top.
if __name__ == "__main__":
    raise SystemExit(main())
