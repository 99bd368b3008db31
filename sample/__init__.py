"""Sampling stage: logit processing (`sample.sampling`), the class-conditional decode loop (`sample.generate`)
and the sampling job that writes N images through Lightning's predict loop (`sample.job`)."""
