"""User-level operations on adapters: convert, validate, inspect, check, resize, extract, Hub, demo."""
