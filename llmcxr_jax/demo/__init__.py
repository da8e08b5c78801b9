"""`make demo`: the whole system end to end on data made on the spot (see __main__.py)."""
