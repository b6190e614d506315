# The one list of the ring core's sources and its strict C flags.
# Included by csrc/Makefile; read by setup.py and tests/_cffi_ring.py, which
# take each "NAME = words" line as it stands (keep them plain: no make
# functions, no continuation lines).  Paths are relative to csrc/.
RING_SOURCES = platform.c waiting.c segment.c attach_table.c ring.c recover.c limits.c task_records.c
RING_HEADERS = ring.h ring_internal.h ring_limits.h task_records.h
RING_STRICT = -std=c11 -Wall -Wextra -Werror
