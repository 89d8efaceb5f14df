"""Ray job entrypoints run from a checkout: ``ray job submit --working-dir . -- python -m launch.attribute_dataset``.

Clusters with distattr installed run the console script instead (``distattr attribute-dataset``).
"""
