"""What every bench script does with its figures: print them, and keep them as JSON when asked."""

from __future__ import annotations

import json


def save_json(result: dict, path: str | None) -> None:
    """Write result to path (nothing when path is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def emit(result: dict, path: str | None) -> None:
    """Print result as JSON and save it to path."""
    print(json.dumps(result, indent=1))
    save_json(result, path)
