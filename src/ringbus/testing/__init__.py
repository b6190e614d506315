"""Helpers for ringbus's own tests and benchmarks (not used by the library).

``ringbus.testing.redis_server`` starts a private, throw-away redis-server.
"""
