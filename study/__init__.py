"""The layer above the stages: the study runner, its results, report and figures, the demo, AR config
generation and the digits domain classifier's training (`python -m study`). No stage imports it."""
