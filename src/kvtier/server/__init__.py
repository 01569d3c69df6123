"""The standalone cache daemon (``kvtier server``), its protocol, client and HTTP face."""
