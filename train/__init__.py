"""Training stage: the Lightning core (LitVQ, LitAR, callbacks and throughput, checkpoints, strategies, the
CLI), its DataModules (`train.data`) and the jobs that prepare data for it (`train.prepare`)."""
