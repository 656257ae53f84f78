"""Weight-only interpretation of SAE features (arXiv 2601.22447): a plain library, no Dagster."""
