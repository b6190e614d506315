"""Testing helpers.

``ringbus.testing.pytest_plugin``: fixtures for apps' own tests (an inline
bus, a real pool), registered as a pytest plugin by the package.
``ringbus.testing.redis_server`` starts a private, throw-away redis-server
(for ringbus's own tests and benchmarks).
"""
