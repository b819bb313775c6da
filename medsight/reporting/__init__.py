"""Reports people would rather see than read: figures (plots.py) and the self-contained HTML report (html.py)."""
