"""Per-layer statistics collection, phases, outputs, and the analyses built on them."""
