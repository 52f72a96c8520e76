"""inspo: preference optimisation (the DPO family) and its InSPO self-reflective forms."""

__version__ = "0.1.0"
