"""One module per `nanoplay` subcommand; each has register(subparsers)."""
