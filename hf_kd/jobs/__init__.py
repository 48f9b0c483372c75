"""The main jobs behind `hf-kd distill` and the recipes: real teacher -> student runs with a report."""
