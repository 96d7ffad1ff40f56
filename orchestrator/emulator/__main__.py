"""`python -m orchestrator.emulator`: the emulator command on its own."""

from orchestrator.emulator import cli

if __name__ == "__main__":
    cli.emulator_command()
