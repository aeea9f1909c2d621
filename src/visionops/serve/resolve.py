"""``python -m visionops.serve.resolve URI``: print where a model URI points, as JSON.

The serving process runs this in a child process (``resolve_model_uri(isolated=True)``)
so that resolving ``models:/NAME@ALIAS`` — which needs MLflow — leaves no MLflow
modules resident in the server. Prints ``{"path", "name", "version", "alias"}`` on the
last line of stdout; on failure prints the reason on stderr and exits with code 2.
"""

from __future__ import annotations

import json
import sys

from visionops.errors import VisionOpsError


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m visionops.serve.resolve MODEL_URI", file=sys.stderr)
        return 2
    from visionops.serve.model import resolve_model_uri

    try:
        ref = resolve_model_uri(args[0])
    except VisionOpsError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(
        json.dumps(
            {"path": str(ref.path), "name": ref.name, "version": ref.version, "alias": ref.alias}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
