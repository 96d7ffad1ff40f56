"""The BES emulator (SPEC §4): `server.build_app`, `server.running`, `cli.emulator_command`."""
