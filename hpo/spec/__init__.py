"""The study spec: its schema (``schema``), the table of domains (``domains``), the checks of every value against it (``checks``) and the hyperparameter vocabulary (``hyperparams``)."""
