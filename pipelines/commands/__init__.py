"""One module per ``anomaly`` verb: ``add_parser(subparsers)`` registers it and sets ``func``."""
