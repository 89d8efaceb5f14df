"""Views of results: console heatmaps, self-contained HTML, progress bars."""
