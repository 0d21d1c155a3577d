"""``hpo bench``: measure and check this machine's training paths in one run (see ``runner``)."""

from hpo.bench.runner import PLANS, format_table, run_bench

__all__ = ["PLANS", "format_table", "run_bench"]
