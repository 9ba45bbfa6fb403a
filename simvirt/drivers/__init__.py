"""Guest drivers: run in the driver process, over guest RAM they own."""
