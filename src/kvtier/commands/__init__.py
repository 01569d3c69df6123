"""One module per ``kvtier`` sub-command (see ``kvtier.cli``)."""
