"""`python -m train.prepare <shards|tokens|shapes> [--flags] [--config YAML]`: the command line of the data
preparation steps, `train.prepare.write_shards.write_shards` (an ImageFolder tree -> webdataset image
shards), `train.prepare.extract_tokens.extract_tokens` (images -> token shards) and
`train.prepare.shapes.write_shapes` (the coloured-shapes example ImageFolder tree of docs/own_data.md).
Nothing else lives here."""

from __future__ import annotations

import sys
from typing import Any

from jsonargparse import auto_cli, set_parsing_settings

from train.config_trust import check_class_paths, split_allow_flags
from train.prepare.extract_tokens import extract_tokens
from train.prepare.shapes import write_shapes
from train.prepare.write_shards import write_shards

COMMANDS = {"shards": write_shards, "tokens": extract_tokens, "shapes": write_shapes}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    # `--data '{class_path: ...}'` imports what it names: the same check as python -m train, before parsing
    argv, allowed = split_allow_flags(list(sys.argv[1:] if argv is None else argv))
    check_class_paths(argv, allowed)
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    return auto_cli(COMMANDS, args=argv, as_positional=False, prog="python -m train.prepare")


if __name__ == "__main__":
    main()
