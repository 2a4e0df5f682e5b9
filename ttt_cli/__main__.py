"""`python -m ttt_cli` = the `ttt` command."""

from .cli.app import main

main()
