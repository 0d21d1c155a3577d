"""Network pieces (``layers``) and the model families (``models``: the MLP and the builder; ``cnn``)."""
