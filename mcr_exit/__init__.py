"""mcr-exit: find a causal LM's mix / compress / refine phases, and serve from them.

Index conventions used everywhere in this package:

* ``hidden[i]``, i = 0..L: 0 is the embedding output, i the raw output of block i
  (block i counted from 1 here), L the raw output of the last block *before* the final norm.
* ``attention[j]``, j = 0..L-1: block j counted from 0, which reads ``hidden[j]``.
* Entropies are in nats.
"""

__version__ = "0.1.0"
