"""`python -m metrics --samples DIR --reference REF [...]`: the jsonargparse CLI of `metrics.evaluate.evaluate`.

All logic lives in `metrics.evaluate`; this file only parses arguments and prints the metric values.
"""

from __future__ import annotations

import json

from jsonargparse import CLI

from metrics.evaluate import evaluate


def main() -> None:
    """Parse arguments, evaluate, print the metric values (the full report is in metrics.json)."""
    report = CLI(evaluate, as_positional=False)
    print(json.dumps({"metrics": report["metrics"], "skipped": report["skipped"]}, indent=2))


if __name__ == "__main__":
    main()
