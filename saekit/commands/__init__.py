"""`saekit` subcommands, one module each. A module exposes `register(subparsers)`, which adds
its parser and sets `func` (called with the parsed arguments, returning an exit code)."""
