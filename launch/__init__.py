"""Ray job entrypoints: ``ray job submit --working-dir . -- python -m launch.attribute_dataset ...``."""
