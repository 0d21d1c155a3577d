"""Commands of this stage (not built yet)."""

COMMANDS: list = []
