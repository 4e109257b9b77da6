"""Column types that map to native Postgres types and portable equivalents on SQLite."""

from __future__ import annotations

from sqlalchemy import JSON, Integer, String, Uuid
from sqlalchemy.dialects import postgresql

# Client-generated UUID strings: native `uuid` on Postgres, the same 36-character text on SQLite, so an id
# printed by the CLI can be pasted into plain SQL on either database.
IdType = Uuid(as_uuid=False).with_variant(String(36), "sqlite")

# Per-token confidences: `double precision[]` on Postgres, a JSON list on SQLite. Double, not real: a resumed
# search must see exactly the floats the uninterrupted one computed.
FloatArray = JSON().with_variant(postgresql.ARRAY(postgresql.DOUBLE_PRECISION()), "postgresql")

# Token ids (a resume needs them exactly): `integer[]` on Postgres, a JSON list on SQLite.
IntArray = JSON().with_variant(postgresql.ARRAY(Integer()), "postgresql")

# Free-form documents (configs, payloads, metadata): `jsonb` on Postgres, JSON text on SQLite.
JsonDoc = JSON().with_variant(postgresql.JSONB(), "postgresql")
