"""The commands, one module per stage; ``hpo.cli`` registers them. Each parses, calls the library, prints."""
