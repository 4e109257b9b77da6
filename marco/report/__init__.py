"""Reports over the store: paper-style accuracy tables, accuracy-vs-tokens plots, HTML tree views."""
