"""The playground: a Textual app to compare, inspect and chat with models (`nanoplay` with no subcommand)."""
