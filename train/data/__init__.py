"""Training data: image transforms, the embedded digits, image folders and shards, extraction views, and
token shards (the DataModules the Lightning modules train on)."""
