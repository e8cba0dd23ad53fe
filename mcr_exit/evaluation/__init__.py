"""Downstream tasks across depth: LogitLens, lm-eval, linear probes and MTEB at every hidden index."""
