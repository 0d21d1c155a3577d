"""Export folders (``folder``) and ``hpo.load`` / ``hpo predict`` (``loading``)."""
