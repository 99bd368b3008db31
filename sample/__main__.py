"""`python -m sample --config configs/sample/<name>.yaml [--flags]`: the command line of
`sample.job.sample_images` (an AR checkpoint plus a tokenizer -> N images); nothing else lives here."""

from __future__ import annotations

from typing import Any

from jsonargparse import auto_cli, set_parsing_settings

from sample.job import sample_images


def main(argv: list[str] | None = None) -> dict[str, Any]:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    return auto_cli(sample_images, args=argv, as_positional=False, prog="python -m sample")


if __name__ == "__main__":
    main()
