"""Lenses and circuits: what a feature direction reads and writes through the model's weights, the control SAE and
null directions."""
