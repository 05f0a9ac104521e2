"""diagnostics: AI diagnostic support for public health networks."""

__version__ = "0.1.0"
