"""Small end-to-end examples of :mod:`bilevel` (``python -m bilevel.examples.ridge``)."""
