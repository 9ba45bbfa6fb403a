"""vhost-user: sans-IO message codec, backend (device) server, frontend (driver) client."""
