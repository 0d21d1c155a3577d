"""The search: the search space (``space``), grid studies (``grid``), studies with their sampler and pruner (``study``) and the Optuna objective (``objective``)."""
