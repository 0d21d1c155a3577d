"""The HTML report (``html``) and its figures (``study_figures``, ``figures``, ``insight``); optuna-dashboard (``dashboard``)."""
