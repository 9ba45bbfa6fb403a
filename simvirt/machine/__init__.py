"""``simvirt run``: a whole machine (driver process + device processes) from a TOML config."""
