"""``ppg compare``: train policy classes with the same budget and seeds, then compare them.

``run`` orchestrates the fits, ``stats`` scores and aggregates them, ``plot`` draws the figure,
``policies`` parses the class names.
"""
