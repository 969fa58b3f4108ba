"""A toy world with ground truth for Character-Adapter: synthetic characters, tiny trained models, an ablation."""
