"""What users look at: plots, the feature browser, the Neuronpedia export."""
