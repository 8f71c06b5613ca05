"""posterfusion: movie genres from posters."""
__version__ = "0.1.0"
