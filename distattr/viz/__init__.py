"""Views of results: console heatmaps (rich), self-contained HTML and notebook fragments, matplotlib figures
(``plot``, optional ``viz`` extra), progress bars."""
