"""Device side: the generic vhost-user device model and one package per device type."""
