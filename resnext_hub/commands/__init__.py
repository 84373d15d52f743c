"""The subcommands of ``python -m resnext_hub``: one module each, with ``register(subparsers)``."""
