"""Sampling stage: logit processing (`sample.sampling`) and the class-conditional decode loop (`sample.generate`)."""
