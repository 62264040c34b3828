"""One module per cag-node sub-command; each exposes register(subparsers)."""
