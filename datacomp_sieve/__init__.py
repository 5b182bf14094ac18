"""datacomp-sieve: Sieve data filtering for DataComp pools."""

__version__ = "0.1.0"
