"""sgpo: Self-Generated Preference Optimization."""
__version__ = "0.1.0"
