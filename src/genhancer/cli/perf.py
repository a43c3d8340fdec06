"""CLI commands of this area; filled in by its module owner."""


def add_commands(sub) -> None:
    """Register this area's sub-commands on the top-level argparse sub-parsers."""
