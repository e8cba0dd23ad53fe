"""Names and defaults that several commands share, defined once.

This module imports nothing heavy: the command line reads it to build ``--help`` without loading
torch. The code that acts on these names imports them from here (metrics/pooling.py, models/tokens.py).
"""

from __future__ import annotations

# How one hidden state becomes one vector per text (mcr_exit.metrics.pooling.pool_hidden):
#   mean_no_first  mean over the real tokens except position 0, which carries the massive activation
#                  in the middle layers (whether it is a BOS or, with --bos none, the first text token);
#   mean           mean over every real token, position 0 included;
#   mean_no_massive mean over the real tokens that are not massive activations at that hidden state
#                  (norm >= 10 x the row's median token norm, wherever they sit; the rule is stored
#                  in the phase profile as massive_activations.rule);
#   last           the last real token.
POOLINGS = ("mean_no_first", "mean_no_massive", "mean", "last")
DEFAULT_POOLING = "mean_no_first"
# Older name of mean_no_first, still accepted on input; position 0 is not always a BOS (--bos none).
POOLING_ALIASES = {"mean_no_bos": "mean_no_first"}

# What sits at position 0 (mcr_exit.models.tokens.resolve_bos).
BOS_POLICIES = ("auto", "force", "none")

# Token budgets (BOS included). The analysis measures statistics of whole prompts, as the paper does
# (1024 tokens); the embedding commands (probe, mteb, the Python encoder) pool sentences and short
# documents, where 512 tokens keep every task's texts whole at half the memory.
ANALYSIS_MAX_LENGTH = 1024
EMBEDDING_MAX_LENGTH = 512
