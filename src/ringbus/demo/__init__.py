"""The ``ringbus demo``: a uvicorn/Starlette app whose signups send mail over
SMTP, inline versus through ringbus task workers, measured end to end.

Run it with ``ringbus demo`` or ``python -m ringbus.demo`` (needs the
``demo`` extra: starlette, uvicorn, aiosmtpd, matplotlib).
"""
