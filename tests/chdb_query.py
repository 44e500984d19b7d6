"""Runs SQL on an embedded ClickHouse path from its own process and prints the result as JSON.

chDB allows one engine path per process, so tests look into a buffer process's data this way
(after it exited, or before it started): ``python -m tests.chdb_query PATH SQL [SQL ...]``.
"""

from __future__ import annotations

import json
import sys

import clickhouse_connect


def main() -> None:
    path, *statements = sys.argv[1:]
    client = clickhouse_connect.get_client(dsn=f"chdb://{path}")
    out = []
    for sql in statements:
        result = client.query(sql) if sql.lstrip().upper().startswith("SELECT") else None
        if result is None:
            client.command(sql)
            out.append(None)
        else:
            out.append([list(r) for r in result.result_rows])
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
