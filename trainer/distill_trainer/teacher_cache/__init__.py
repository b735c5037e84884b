"""The offline teacher cache: the teacher's targets written once, read by any number of student runs.

``encoding``: one label token's targets <-> a fixed number of bytes (float32: exactly what the live teacher hands
over; compact: quantised values, bit-packed indices). ``fingerprint``: what the targets depend on, and the refusal
of a run whose config differs. ``store``: shards (one file per fixed set of records, checksummed, written
atomically) and the manifest. ``writer``/``reader``: the teacher ranks that write it and the student-side feed that
streams it.
"""
