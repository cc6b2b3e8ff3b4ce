"""`tasn` subcommands for this area (placeholder until the area lands)."""


def add_commands(sub, common) -> None:
    return None
