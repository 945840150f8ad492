"""python -m adabatch_hvd: the same as adabatch-train."""

from .cli import main

main()
