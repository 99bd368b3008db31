"""`python -m metrics <evaluate|tokenizer> [--flags] [--config YAML]`: the command line of
`metrics.evaluate.evaluate` (its `EvaluateConfig` fields are the flags: FID, IS, KID, precision/recall,
class accuracy of samples -> metrics.json) and
`metrics.tokenizer_eval.evaluate_tokenizer` (PSNR, SSIM, rFID of a tokenizer); it prints the metric values
(the full report with its provenance is the JSON file). Nothing else lives here."""

from __future__ import annotations

import json
import sys
from typing import Any

from jsonargparse import auto_cli, set_parsing_settings

from metrics.evaluate import EvaluateConfig, evaluate
from metrics.tokenizer_eval import evaluate_tokenizer

COMMANDS = {"evaluate": EvaluateConfig, "tokenizer": evaluate_tokenizer}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    result = auto_cli(COMMANDS, args=argv, as_positional=False, prog="python -m metrics")
    report = evaluate(result) if isinstance(result, EvaluateConfig) else result
    print(json.dumps({key: report[key] for key in ("metrics", "skipped") if key in report}, indent=2))
    return report


if __name__ == "__main__":
    main()
