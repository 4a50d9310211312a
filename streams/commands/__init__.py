"""One module per ``roadpulse`` sub-command; each has ``add_parser(subparsers)`` and ``run(args)``."""
