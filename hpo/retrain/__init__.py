"""The k-fold retrain (``run``), its checkpoints (``checkpoint``), outputs (``outputs``), ensembles (``ensemble``) and artifacts (``results``)."""
