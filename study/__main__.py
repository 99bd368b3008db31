"""`python -m study <run|report|demo|configs|budget|classifier|curve> [--flags] [--config YAML]`: the command line
of the layer above the stages. Each subcommand is a plain typed function; the work is in the modules named
here, never in this file."""

from __future__ import annotations

import shlex
import sys
from typing import Any

from jsonargparse import auto_cli, set_parsing_settings

from study.checkpoint_curve import curve
from study.configs import budget, write_configs
from study.demo import demo
from study.domain_classifier import train_classifier
from study.report import build_report
from study.runner import study

COMMANDS = {"run": study, "report": build_report, "demo": demo, "configs": write_configs, "budget": budget,
            "classifier": train_classifier, "curve": curve}


def main(argv: list[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"] and not any(arg.startswith("--command") for arg in argv):
        # shown in the report; right after the subcommand, so a trailing --<section>.help still parses
        argv = [argv[0], "--command", "python -m study " + shlex.join(argv), *argv[1:]]
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    result = auto_cli(COMMANDS, args=argv, as_positional=False, prog="python -m study")
    if argv[:1] in (["report"], ["configs"]):
        print(result if argv[:1] == ["report"] else "\n".join(map(str, result)))
    return result


if __name__ == "__main__":
    main()
