"""Command modules beyond the core ones in ``hpo.cli``; each defines click commands for one stage."""
