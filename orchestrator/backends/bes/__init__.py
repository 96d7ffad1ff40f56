"""The BES client: wire protocol (pure), HTTP client, per-service throttle gate."""
