"""The emulator (BES, RRS, Azure ML batch endpoints; docs/emulator.md): `server.build_app`,
`server.running`, `cli.emulator_command`."""
