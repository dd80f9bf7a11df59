"""The one runtime every Tailor service is built on: server, errors, settings, logs, store, operations."""
