"""The study store: where it is (``config``), which errors are retried (``retry``), Optuna's RDB
store as workers use it (``storage``), safe schema creation (``schema``), coordination queries
(``queries``), the artifact store (``artifacts``), the exact budget (``budget``), fast trial reads
(``trials``), study statistics (``statistics``), data sets in the store (``data_tables``) and every
use of Optuna's private API (``optuna_private``).

Import the submodules: this package imports nothing, so ``hpo.load`` never pulls Optuna in."""
