"""Sample-quality metrics: FID (our float64 Frechet distance), IS/KID/precision-recall (torch-fidelity's
formulas on our extractor's features), cached reference statistics and the `python -m metrics` CLI.

Modules: `fid` (distance + stats files), `features` (extractor registry, Inception without downloads),
`reference` (ADM npz / image folder / webdataset shards -> cached stats), `evaluate` (metrics.json).
Domain classifiers are added by `metrics.domain` through `features.register_extractor`.
"""
