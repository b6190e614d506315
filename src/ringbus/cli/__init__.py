"""The ``ringbus`` command line (``ringbus.cli.main:main``)."""
