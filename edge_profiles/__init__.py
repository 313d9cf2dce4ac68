"""Edge device profiles (TOML), shipped as package data: faasmoe.edge_profiles."""
