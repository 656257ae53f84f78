"""Getting and reading weights: the hub and its cache, which files an SAE and its model need, SAE formats, model
checkpoints and geometry, the vocabulary."""
