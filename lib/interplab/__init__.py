"""interplab: the notebook-first companion to *Interpreting Deep Learning Models* (Basu, 2025)."""
__version__ = "0.1.0"
