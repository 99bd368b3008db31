"""Data preparation jobs: image folders to webdataset image shards, and images to token shards
(`python -m train.prepare`)."""
