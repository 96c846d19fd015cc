"""The package version: the one source read by setup.py and by ``d2g_fast.__version__``.

Plain assignment only: setup.py reads this file without importing the package (which needs
torch and the compiled extension)."""
__version__ = "0.1.0"
