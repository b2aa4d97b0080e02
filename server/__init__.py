"""The service: settings, API schemas, routes, engine and batcher, metrics, CLI."""
